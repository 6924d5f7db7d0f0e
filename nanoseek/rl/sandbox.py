"""Code reward: run a completion's code against its tests in a sandbox; the verdict is decided out of the code's reach.

**Two processes.** Each run starts two Python processes, each in its own sandbox:

- the *solution* process executes the code (``solution.py``, ``__name__ == "solution"``) and then only answers
  requests about the objects it defined;
- the *test* process executes the test snippets (e.g. ``assert f(2) == 4``) and reports each verdict to the parent.
  It never runs the solution's code. Each top-level name the code defined is, in the test process, either a *plain
  value* (``None``, bool, int, float, complex, str, bytes, bytearray, and list / tuple / dict / set / frozenset of
  those -- exact built-in types only, no subclasses), copied once after the code ran through a canonical JSON
  encoding, or a ``Remote`` handle. A call ``f(2)`` sends the plain arguments to the solution process and gets
  the result back the same way. A handle supports calls, attribute access, items, iteration, ``len``, ``bool``,
  ``str`` and ``repr``; its equality is identity and it has no ordering, so the solution's own ``__eq__`` (or
  ``__lt__``, ``__contains__``) never decides a test. Exceptions come back by name (a built-in exception type, else
  ``SolutionError``). A name that would shadow a builtin or a standard module (``abs``, ``math``...) is not passed
  on, except a module the code really imported, which the test process imports itself.

The test process holds the only channel to the parent (a file the solution process has no descriptor for and cannot
see). The solution process never receives the tests or their expected values, only the arguments of its own calls.
Whatever it does -- patching builtins, writing to every descriptor it has, exiting early -- the most it can achieve
is to choose the results of the calls it is asked, which is what any solution does.

**Isolation** (``isolation="bwrap"``, the default; also ``NANOSEEK_SANDBOX=bwrap``). Both processes run the base
interpreter with ``-I -B -S`` (the standard library only, no site-packages), each under bubblewrap (``bwrap``,
Debian package ``bubblewrap``) with new network, PID, IPC, UTS and mount namespaces:

- no network of any kind: an empty network namespace (its own loopback only), and seccomp makes ``socket()`` (every
  address family) and ``io_uring_*`` fail; only ``socketpair(AF_UNIX)`` works (asyncio needs it);
- an unprivileged identity: uid/gid 65534 (``nobody``), no supplementary groups, no capabilities (an empty bounding
  set) and ``no_new_privs``. As root, bwrap runs without a user namespace and the harness drops to 65534 itself, so
  the process is 65534 on the host too; otherwise bwrap maps 65534 onto the caller's uid in a user namespace in
  which no further user namespaces can be made;
- a read-only filesystem view of what the interpreter needs: ``/usr``, the ``/lib*`` and ``/bin`` links, the base
  Python prefix, the directories of shared libraries the parent has loaded (outside site-packages) and
  ``/etc/ld.so.cache``; plus its own temporary directory as ``/sandbox`` (working directory, ``$HOME``,
  ``$TMPDIR``, ``/tmp``), a private ``/proc`` showing only the sandbox's processes and a minimal ``/dev``. The
  solution and the tests get different directories and cannot see each other's processes;
- a clean environment: the parent's variables reach neither the sandbox nor bwrap itself.

Inside, in layers, as defence in depth: resource limits (RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_CORE 0,
RLIMIT_NPROC), a non-dumpable process, Landlock (Linux >= 5.13: reads only beneath the paths above, writes only in
the working directory, no TCP, no signals or abstract sockets outside the sandbox) and seccomp (Linux x86-64 and
aarch64: no ``fork``/``vfork``/non-thread ``clone`` -- so no subprocess and no fork bomb; threads work --, no
``socket``, ``io_uring``, ``ptrace``, ``process_vm_*``, ``unshare``/``setns``/``mount``, keyrings, ``bpf``,
``perf_event_open``, ``userfaultfd``). The parent kills both processes on the wall-clock timeout and after every run,
so a crash, an infinite loop, a memory bomb or a fork bomb scores 0 and the call returns within ``timeout`` plus
start-up (a run takes about 0.2 s). :attr:`SandboxResult.protections` lists what was applied.

**Without bubblewrap** (not installed, not Linux, or namespaces forbidden) :func:`run_code` raises
:class:`SandboxUnavailable` rather than quietly run hostile code with weaker protections; :func:`isolation_error`
says why. ``isolation="layers"`` (or ``NANOSEEK_SANDBOX=layers``) opts in, with a warning, to the layers alone: the
two-process verdict, rlimits, no_new_privs, non-dumpable processes, Landlock, seccomp (where seccomp is missing, a
Python-level socket guard that ctypes gets around), and as root a drop to uid 65534 when the interpreter is
readable by it (else root without capabilities). That mode has no network namespace (seccomp alone stops sockets),
no private ``/proc`` (Landlock hides it), and no restriction of reads without Landlock; without the uid drop, files
the caller owns outside the directory can still be chmod-ed, and without Landlock a same-uid solution could read
the tests' file.

**Not guaranteed.** Namespaces, Landlock and seccomp are the kernel's isolation, not a VM: a kernel exploit escapes
them. Denial of service is bounded only by the limits above (CPU time, address space, file size, the wall clock;
not the disk space of the working directory). Tests see the solution's module-level plain values as they were when
the code finished (a test reading a global after calling a function sees the old value), and non-plain values only
as handles, so comparing those by ``==`` fails: pass plain data in and out, as HumanEval / MBPP-style tests do.
Tests are trusted input; they run sandboxed with the same limits. The solution's printed output is returned but
never interpreted.
"""

from __future__ import annotations

import functools
import json
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO

SANDBOX_UID = SANDBOX_GID = 65534
"""The identity sandboxed code runs as (``nobody``/``nogroup`` on Debian)."""
MAX_MESSAGE = 32 << 20
"""Largest message (one encoded value) between the solution and the test process, in bytes."""
ISOLATIONS = ("bwrap", "layers")
_MOUNT = "/sandbox"  # where a run's directory appears inside bwrap

# Shared by both harnesses: limits, identity, Landlock, seccomp, the value codec and message framing. Stdlib only.
# Run as ``python -I -B -S -c HARNESS CONFIG_JSON`` in the run's directory.
_PRELUDE = r'''# nanoseek-sandbox-harness
import ctypes, json, os, resource, stat, struct, sys, traceback
cfg = json.loads(sys.argv[1])
applied = []
linux = sys.platform == "linux"

for name, value in cfg["rlimits"].items():
    try:
        resource.setrlimit(getattr(resource, name), (value, value))
        applied.append(name)
    except (ValueError, OSError):
        pass

libc = ctypes.CDLL(None, use_errno=True)
syscall = libc.syscall
syscall.restype = ctypes.c_long

def effective_caps():
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        return -1

def drop_bounding_set():  # needs CAP_SETPCAP; fails harmlessly past the last capability
    for cap in range(64):
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP
    libc.prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL

def clear_caps():  # empty permitted, effective and inheritable sets
    header = struct.pack("Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    if libc.capset(header, bytes(24)) != 0:
        raise OSError(ctypes.get_errno(), "capset")

identity = cfg["identity"]  # [uid, gid]: switch to it (as root); "caps": stay root without capabilities; None
if identity is not None:  # failures propagate: better no run than a privileged one
    drop_bounding_set()
    if identity != "caps":
        uid, gid = identity
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) or os.getgroups():
            raise OSError("could not switch identity")
        applied.append("uid-drop")
    clear_caps()
caps = effective_caps()
if caps == 0:
    applied.append("no-caps")
if linux and libc.prctl(38, 1, 0, 0, 0) == 0:  # PR_SET_NO_NEW_PRIVS, needed by Landlock and seccomp
    applied.append("no_new_privs")
if linux and libc.prctl(4, 0, 0, 0, 0) == 0:  # PR_SET_DUMPABLE 0: /proc/<pid> and ptrace closed to same-uid processes
    applied.append("non-dumpable")

def landlock(read, write, rw_files):
    abi = syscall(444, None, 0, 1)  # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
    if abi < 1:
        return False
    fs = (1 << 13) - 1  # EXECUTE, WRITE_FILE, READ_FILE, READ_DIR, REMOVE_*, MAKE_*
    if abi >= 2: fs |= 1 << 13   # REFER
    if abi >= 3: fs |= 1 << 14   # TRUNCATE
    net = 3 if abi >= 4 else 0   # BIND_TCP | CONNECT_TCP, no rule: denied
    scoped = 3 if abi >= 6 else 0  # ABSTRACT_UNIX_SOCKET | SIGNAL
    attr = struct.pack("QQQ", fs, net, scoped)[: 8 if abi < 4 else 16 if abi < 6 else 24]
    ruleset = syscall(444, attr, len(attr), 0)
    if ruleset < 0:
        return False
    file_only = 1 | 2 | 4 | ((1 << 14) if abi >= 3 else 0)  # rights that apply to a file (not a directory)
    rules = [(p, 1 | 4 | 8) for p in read] + [(p, fs) for p in write] + [(p, 2 | 4 | (1 << 14)) for p in rw_files]
    try:
        for path, rights in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                if not stat.S_ISDIR(os.fstat(fd).st_mode):
                    rights &= file_only
                rule = struct.pack("=Qi", rights & fs, fd)  # struct landlock_path_beneath_attr (packed)
                if syscall(445, ruleset, 1, rule, 0) != 0:  # LANDLOCK_RULE_PATH_BENEATH
                    return False
            finally:
                os.close(fd)
        return syscall(446, ruleset, 0) == 0  # landlock_restrict_self
    finally:
        os.close(ruleset)

SYSCALLS = {  # machine: (audit arch, {syscall: number}); see asm/unistd_64.h and asm-generic/unistd.h
    "x86_64": (0xC000003E, dict(
        clone=56, fork=57, vfork=58, clone3=435, socket=41, socketpair=53, io_uring_setup=425, io_uring_enter=426,
        io_uring_register=427, ptrace=101, process_vm_readv=310, process_vm_writev=311, unshare=272, setns=308,
        mount=165, umount2=166, pivot_root=155, chroot=161, open_tree=428, move_mount=429, fsopen=430, fsconfig=431,
        fsmount=432, fspick=433, mount_setattr=442, add_key=248, request_key=249, keyctl=250, bpf=321,
        perf_event_open=298, userfaultfd=323)),
    "aarch64": (0xC00000B7, dict(
        clone=220, clone3=435, socket=198, socketpair=199, io_uring_setup=425, io_uring_enter=426,
        io_uring_register=427, ptrace=117, process_vm_readv=270, process_vm_writev=271, unshare=97, setns=268,
        mount=40, umount2=39, pivot_root=41, chroot=51, open_tree=428, move_mount=429, fsopen=430, fsconfig=431,
        fsmount=432, fspick=433, mount_setattr=442, add_key=217, request_key=218, keyctl=219, bpf=280,
        perf_event_open=241, userfaultfd=282)),
}
DENIED = ("io_uring_setup", "io_uring_enter", "io_uring_register", "ptrace", "process_vm_readv", "process_vm_writev",
          "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "open_tree", "move_mount", "fsopen",
          "fsconfig", "fsmount", "fspick", "mount_setattr", "add_key", "request_key", "keyctl", "bpf",
          "perf_event_open", "userfaultfd")

def seccomp():
    arch = SYSCALLS.get(os.uname().machine)
    if arch is None:
        return False
    audit, nr = arch
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
    ALLOW, KILL, ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
    prog = [
        (LD, 0, 0, 4), (JEQ, 1, 0, audit), (RET, 0, 0, KILL),              # foreign ABI -> kill
        (LD, 0, 0, 0), (JGE, 0, 1, 0x40000000), (RET, 0, 0, ERRNO | 1),    # x32 syscalls -> EPERM
    ]
    def rule(name, *body):  # if nr == NAME: body (which always returns), else skip it
        if name in nr:
            prog.extend([(JEQ, 0, len(body), nr[name]), *body])
    rule("clone", (LD, 0, 0, 16), (JSET, 0, 1, 0x00010000), (RET, 0, 0, ALLOW), (RET, 0, 0, ERRNO | 11))  # threads
    rule("fork", (RET, 0, 0, ERRNO | 11))
    rule("vfork", (RET, 0, 0, ERRNO | 11))
    rule("clone3", (RET, 0, 0, ERRNO | 38))  # ENOSYS: libc falls back to clone
    rule("socket", (RET, 0, 0, ERRNO | 13))  # EACCES, every address family
    rule("socketpair", (LD, 0, 0, 16), (JEQ, 0, 1, 1), (RET, 0, 0, ALLOW), (RET, 0, 0, ERRNO | 13))  # AF_UNIX only
    for name in DENIED:
        rule(name, (RET, 0, 0, ERRNO | 1))
    prog.append((RET, 0, 0, ALLOW))
    code = b"".join(struct.pack("HBBI", c, jt, jf, k & 0xFFFFFFFF) for c, jt, jf, k in prog)
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("HP", len(prog), ctypes.addressof(buf))  # struct sock_fprog
    return libc.prctl(22, 2, fprog, 0, 0) == 0  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER

if "no_new_privs" in applied:
    try:
        if landlock(cfg["read"], [os.getcwd()], ["/dev/null"]):
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
sys.stdin = open(os.devnull)

MAX_MESSAGE = cfg["max_message"]
BIG = 1 << 53
SEQUENCES = {"tuple": tuple, "set": set, "frozenset": frozenset}

def encode(v, ref):  # canonical JSON form of a plain value; anything else becomes {"ref": ref(v)}
    t = type(v)
    if v is None or t is bool or t is str or t is float:
        return v
    if t is int:
        return v if -BIG < v < BIG else {"int": hex(v)}
    if t is list:
        return [encode(x, ref) for x in v]
    if t is tuple or t is set or t is frozenset:
        return {t.__name__: [encode(x, ref) for x in v]}
    if t is dict:
        return {"dict": [[encode(k, ref), encode(x, ref)] for k, x in v.items()]}
    if t is bytes or t is bytearray:
        return {t.__name__: v.hex()}
    if t is complex:
        return {"complex": [v.real, v.imag]}
    return {"ref": ref(v)}

def decode(x, deref):
    t = type(x)
    if x is None or t is bool or t is int or t is float or t is str:
        return x
    if t is list:
        return [decode(i, deref) for i in x]
    if t is dict and len(x) == 1:
        (tag, val), = x.items()
        if tag in SEQUENCES and type(val) is list:
            return SEQUENCES[tag](decode(i, deref) for i in val)
        if tag == "dict" and type(val) is list:
            return {decode(k, deref): decode(v, deref) for k, v in val}
        if tag == "int" and type(val) is str:
            return int(val, 16)
        if tag in ("bytes", "bytearray") and type(val) is str:
            return (bytes if tag == "bytes" else bytearray).fromhex(val)
        if tag == "complex" and type(val) is list and len(val) == 2 and all(type(p) is float for p in val):
            return complex(*val)
        if tag == "ref" and type(val) is int:
            return deref(val)
    raise ValueError("malformed value")

def send(fd, message):
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"message of {len(data)} bytes exceeds the sandbox limit")
    view = memoryview(len(data).to_bytes(4, "big") + data)
    while view:
        view = view[os.write(fd, view):]

def read_exact(fd, n):
    parts = []
    while n:
        part = os.read(fd, min(n, 1 << 20))
        if not part:
            raise EOFError("the other side closed the channel")
        parts.append(part)
        n -= len(part)
    return b"".join(parts)

def recv(fd):
    n = int.from_bytes(read_exact(fd, 4), "big")
    if n > MAX_MESSAGE:
        raise ValueError(f"message of {n} bytes exceeds the sandbox limit")
    return json.loads(read_exact(fd, n))
'''

# The solution process: run the code, tell the test process what it defined, then serve requests until EOF.
_SOLUTION_HARNESS = _PRELUDE + r'''
import types
requests, responses = cfg["fds"]
send(responses, {"protections": applied})  # before any solution code runs
ns = {"__name__": "solution", "__builtins__": __builtins__}
objects, ids = [], {}

def ref(o):
    k = id(o)
    if k not in ids:
        ids[k] = len(objects)
        objects.append(o)  # kept alive, so ids stay unique
    return ids[k]

def deref(n):
    if not 0 <= n < len(objects):
        raise ValueError("unknown object")
    return objects[n]

try:
    exec(compile(open("solution.py", encoding="utf-8").read(), "solution.py", "exec"), ns)
    ran = True
except BaseException:
    traceback.print_exc()
    ran = False
names = []
for name, value in list(ns.items()) if ran else ():
    if name.startswith("__"):
        continue
    if isinstance(value, types.ModuleType):
        names.append([name, {"module": value.__name__}])
        continue
    try:
        enc = encode(value, ref)
        if len(json.dumps(enc)) > MAX_MESSAGE // 4:
            raise ValueError("too large to copy")
    except (RecursionError, ValueError):
        enc = {"ref": ref(value)}
    names.append([name, enc])
send(responses, {"ran": ran, "names": names})
if not ran:
    sys.stdout.flush()
    os._exit(1)

def handle(req):
    op, obj = req["op"], deref(req["ref"])
    if op == "call":
        return obj(*decode(req["args"], deref), **{k: decode(v, deref) for k, v in req["kwargs"]})
    if op == "getattr":
        return getattr(obj, req["name"])
    if op == "setattr":
        return setattr(obj, req["name"], decode(req["value"], deref))
    if op == "getitem":
        return obj[decode(req["key"], deref)]
    if op == "setitem":
        obj[decode(req["key"], deref)] = decode(req["value"], deref)
        return None
    if op == "delitem":
        del obj[decode(req["key"], deref)]
        return None
    unary = {"iter": iter, "next": next, "len": len, "bool": bool, "str": str, "repr": repr}
    if op in unary:
        return unary[op](obj)
    raise ValueError(f"unknown operation {op!r}")

while True:
    try:
        req = recv(requests)
    except (EOFError, OSError, ValueError):
        break
    try:
        reply = {"value": encode(handle(req), ref)}
        if len(json.dumps(reply)) > MAX_MESSAGE - 64:
            raise ValueError("result too large for the sandbox")
    except BaseException as e:
        try:
            reply = {"error": [type(e).__name__, str(e)[:2000]]}
        except BaseException:
            reply = {"error": [type(e).__name__, ""]}
    try:
        send(responses, reply)
    except OSError:
        break
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
'''

# The test process: never runs the solution's code; its names are plain copies or Remote handles.
_TEST_HARNESS = _PRELUDE + r'''
import builtins, importlib
requests, responses, results = cfg["fds"]
tests = json.load(open("tests.json", encoding="utf-8"))

def report(**kv):
    os.write(results, (json.dumps(kv) + "\n").encode())

class SolutionError(Exception):
    """An exception raised in the solution process whose type is not a built-in exception."""

class Remote:
    """An object living in the solution process. Equality is identity; there is no ordering."""
    __slots__ = ("_ref",)
    def __init__(self, ref):
        object.__setattr__(self, "_ref", ref)
    def __call__(self, *args, **kwargs):
        return rpc("call", self, args=encode(list(args), out_ref),
                   kwargs=[[k, encode(v, out_ref)] for k, v in kwargs.items()])
    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return rpc("getattr", self, name=name)
    def __setattr__(self, name, value):
        rpc("setattr", self, name=name, value=encode(value, out_ref))
    def __getitem__(self, key):
        return rpc("getitem", self, key=encode(key, out_ref))
    def __setitem__(self, key, value):
        rpc("setitem", self, key=encode(key, out_ref), value=encode(value, out_ref))
    def __delitem__(self, key):
        rpc("delitem", self, key=encode(key, out_ref))
    def __iter__(self):
        it = rpc("iter", self)
        return it if type(it) is Remote else iter(it)
    def __next__(self):
        return rpc("next", self)
    def __len__(self):
        return rpc("len", self)
    def __bool__(self):
        return rpc("bool", self)
    def __str__(self):
        return rpc("str", self)
    def __repr__(self):
        try:
            r = rpc("repr", self)
            return r if type(r) is str else "<solution object>"
        except Exception:
            return "<solution object>"

remotes = {}

def deref(n):
    if n not in remotes:
        remotes[n] = Remote(n)
    return remotes[n]

def out_ref(v):
    if type(v) is Remote:
        return object.__getattribute__(v, "_ref")
    raise TypeError(f"a {type(v).__name__} cannot be passed to the solution (plain values and its own objects only)")

def rpc(op, target, **fields):
    try:
        send(requests, {"op": op, "ref": object.__getattribute__(target, "_ref"), **fields})
        reply = recv(responses)
        if type(reply) is dict and "value" in reply:
            return decode(reply["value"], deref)
        name, text = reply["error"]
        name, text = str(name), str(text)
    except (OSError, EOFError, ValueError, TypeError, KeyError, RecursionError) as e:
        raise SolutionError(f"no valid answer from the solution process: {e}") from None
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            error = cls(text)
        except Exception:
            error = SolutionError(f"{name}: {text}")
    else:
        error = SolutionError(f"{name}: {text}")
    raise error

try:
    hello = recv(responses)
    report(protections=[str(p) for p in hello["protections"]])
    hello = recv(responses)
    ran = hello["ran"] is True
except Exception:
    ran = False
report(code=ran)
if not ran:
    os._exit(0)
# The solution's names, except that it cannot replace a builtin or a standard module by its own object: a test's
# abs(...) or math.isclose(...) would then hand the expected value to the solution and let it answer.
ns = {"__name__": "__test__", "__builtins__": builtins}
for item in hello["names"] if type(hello.get("names")) is list else ():
    try:
        name, enc = item
        if type(name) is not str or hasattr(builtins, name):
            continue
        if type(enc) is dict and list(enc) == ["module"]:
            module = str(enc["module"])
            if module.partition(".")[0] in sys.stdlib_module_names:
                ns[name] = importlib.import_module(module)
        elif name not in sys.stdlib_module_names:
            ns[name] = decode(enc, deref)
    except Exception:
        continue
for i, test in enumerate(tests):
    try:
        exec(compile(test, f"<test {i}>", "exec"), ns)
        ok = True
    except BaseException:
        traceback.print_exc()
        ok = False
    report(test=i, ok=ok)
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
'''


class SandboxUnavailable(RuntimeError):
    """The requested isolation cannot be set up on this machine."""


@dataclass
class SandboxResult:
    """What one sandboxed run did. ``ran``: the code itself executed without error; ``passed``/``total``: tests;
    ``returncode``: the solution process's exit status; ``stdout``/``stderr``: the solution's output followed by the
    test process's (failed tests' tracebacks); ``protections``: the isolation and layers applied."""

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


def _dedupe(paths: list[str]) -> tuple[str, ...]:
    """Existing paths, shortest first, without those lying beneath another one; never ``/``."""
    kept: list[str] = []
    for p in sorted({os.path.normpath(p) for p in paths if p}, key=len):
        if p != "/" and os.path.exists(p) and not any(p == k or p.startswith(k + "/") for k in kept):
            kept.append(p)
    return tuple(kept)


def _python() -> list[str]:
    """The base interpreter (not a virtual environment's), isolated, without site-packages: stdlib only."""
    exe = getattr(sys, "_base_executable", None) or sys.executable
    return [os.path.realpath(exe), "-I", "-B", "-S"]


@functools.cache
def _read_only_paths() -> tuple[str, ...]:
    """What the interpreter needs to run: /usr, the base Python prefix (and its real location), the directories of
    the shared libraries this process has loaded (except those of installed packages), and the loader's cache."""
    paths = ["/usr", "/etc/ld.so.cache", os.path.dirname(os.path.dirname(_python()[0]))]
    for p in (sys.base_prefix, sys.base_exec_prefix):
        paths += [p, os.path.realpath(p)]
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split(None, 5)[5].strip() for line in f if line.count(" ") >= 5 and ".so" in line}
        paths += [os.path.dirname(p) for p in libs if p.startswith("/") and os.path.isfile(p)
                  and "/site-packages/" not in p and "/dist-packages/" not in p]
    except OSError:
        pass
    return _dedupe(paths)


def _system_links() -> list[tuple[str, str]]:
    """(target, path) for /bin, /lib, ... when they are symlinks (merged /usr); real directories are bound."""
    return [(os.readlink(p), p) for p in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32") if os.path.islink(p)]


def _ancestors(path: str) -> list[str]:
    """``/a/b/c`` -> ``/a``, ``/a/b``, ``/a/b/c``."""
    parts = path.strip("/").split("/")
    return ["/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1) if parts[0]]


def _bwrap_argv(bwrap: str, mode: str, work: str) -> list[str]:
    argv = [bwrap, "--die-with-parent", "--new-session"]
    if mode == "root":  # no user namespace: the harness switches to SANDBOX_UID itself (the host sees it too)
        argv += ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
                 "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP"]
    else:
        argv += ["--unshare-all", "--unshare-user", "--disable-userns", "--uid", str(SANDBOX_UID),
                 "--gid", str(SANDBOX_GID)]
    read_only = _read_only_paths()
    system_dirs = [p for p in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32") if not os.path.islink(p)]
    binds = _dedupe([*read_only, *system_dirs])
    parents = {os.path.dirname(p) for p in binds}  # made explicitly: bwrap makes missing parents 0700
    for d in sorted({a for p in parents for a in _ancestors(p)}, key=len):
        argv += ["--dir", d]
    for p in binds:
        argv += ["--ro-bind", p, p]
    for target, path in _system_links():
        argv += ["--symlink", target, path]
    argv += ["--bind", work, _MOUNT, "--chdir", _MOUNT, "--proc", "/proc", "--dev", "/dev"]
    if not any(p == "/tmp" or p.startswith("/tmp/") for p in read_only):
        argv += ["--symlink", _MOUNT, "/tmp"]
    return argv


def _env(home: str) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home, "TMPDIR": home,
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@functools.cache
def _bwrap_mode() -> tuple[str | None, str]:
    """(bwrap's path, "root" | "userns"): the first set-up that runs Python as SANDBOX_UID here; else (None, why)."""
    if sys.platform != "linux":
        return None, f"bubblewrap needs Linux (this is {sys.platform})"
    bwrap = shutil.which("bwrap") or shutil.which("bwrap", path="/usr/bin:/bin:/usr/local/bin")
    if bwrap is None:
        return None, "bubblewrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    errors = []
    for mode in ("root", "userns") if os.geteuid() == 0 else ("userns",):
        with tempfile.TemporaryDirectory(prefix="nanoseek-sandbox-probe-") as d:
            if mode == "root":
                os.chown(d, SANDBOX_UID, SANDBOX_GID)
                os.chmod(d, 0o711)
            check = (f"import os\nif os.getuid() == 0:\n os.setgroups([]); os.setresgid({SANDBOX_GID}, {SANDBOX_GID}, "
                     f"{SANDBOX_GID}); os.setresuid({SANDBOX_UID}, {SANDBOX_UID}, {SANDBOX_UID})\n"
                     "import ctypes, json, resource, traceback\nopen('probe', 'w').close()")
            argv = _bwrap_argv(bwrap, mode, d) + _python() + ["-c", check]
            try:
                r = subprocess.run(argv, env=_env(_MOUNT), capture_output=True, timeout=60, start_new_session=True)
            except (OSError, subprocess.TimeoutExpired) as e:
                errors.append(f"{mode}: {e}")
                continue
            if r.returncode == 0:
                return bwrap, mode
            errors.append(f"{mode}: {r.stderr.decode(errors='replace').strip()[-300:]}")
    return None, "bubblewrap cannot set up a sandbox here (" + "; ".join(errors) + ")"


def isolation_error() -> str | None:
    """None when :func:`run_code`'s default isolation (bubblewrap) works on this machine, else why not."""
    bwrap, why = _bwrap_mode()
    return None if bwrap else why


@functools.cache
def _warn_layers() -> None:
    warnings.warn("nanoseek sandbox: running code with isolation='layers' (no bubblewrap): best-effort protections "
                  "only, not a boundary for hostile code", RuntimeWarning, stacklevel=3)


def _readable_by_others(path: str) -> bool:
    """Every directory on the way to ``path`` is searchable, and ``path`` readable, by any user (ACLs ignored)."""
    parts = os.path.realpath(path).split("/")
    for i in range(2, len(parts) + 1):
        try:
            mode = os.stat("/".join(parts[:i])).st_mode
        except OSError:
            return False
        last = i == len(parts)
        need = stat.S_IROTH if last and not stat.S_ISDIR(mode) else stat.S_IXOTH | (stat.S_IROTH if last else 0)
        if mode & need != need:
            return False
    return True


def _user_tasks(uid: int) -> int:
    """Processes + threads of ``uid`` (what RLIMIT_NPROC counts); 0 when /proc is unavailable."""
    n = 0
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                st = f.read()
            if int(st[st.index("\nUid:") + 5:].split(None, 1)[0]) == uid:
                n += int(st[st.index("\nThreads:") + 9:].split(None, 1)[0])
        except (OSError, ValueError):
            continue
    return n


def _wait(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``proc`` to exit (without Popen.wait's polling delay); True if it did."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        try:
            select.select([fd], [], [], max(0.0, timeout))
        finally:
            os.close(fd)
    try:
        proc.wait(timeout=0 if fd is not None else max(0.0, timeout))
        return True
    except subprocess.TimeoutExpired:
        return False


def _children(pid: int) -> list[int]:
    out = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(p))
        except (OSError, IndexError, ValueError):
            continue
    return out


def _stop(proc: subprocess.Popen, in_bwrap: bool) -> None:
    """Kill everything a run started. Under bwrap, killing the PID namespace's init (bwrap's child) kills the whole
    namespace, and bwrap exits once its init has gone, which the kernel allows only after every process in it."""
    if proc.poll() is None and in_bwrap:
        for child in _children(proc.pid):
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _wait(proc, 5.0)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _remove(root: str) -> None:
    """Delete a run's directory, also what the code made unreadable (never following a symlink)."""
    for d, dirs, _ in os.walk(root):
        for name in dirs:
            p = os.path.join(d, name)
            try:
                if stat.S_ISDIR(os.lstat(p).st_mode):
                    os.chmod(p, 0o700)
            except OSError:
                pass
    shutil.rmtree(root, ignore_errors=True)


def run_code(
    code: str, tests: Sequence[str] | str = (), *, timeout: float = 5.0, memory_mb: int = 1024, max_threads: int = 32,
    fsize_mb: int = 16, max_output: int = 65536, isolation: str | None = None,
) -> SandboxResult:
    """Run ``code``, then each test snippet (e.g. ``assert f(2) == 4``) against the names it defined, in a sandbox
    (module docstring). The code runs with ``__name__ == "solution"`` (``if __name__ == "__main__"`` blocks are
    skipped) and an empty stdin. ``timeout``: wall clock seconds for the whole run (CPU limit: the same, rounded
    up); ``memory_mb``: address-space limit; ``max_threads``: RLIMIT_NPROC headroom above the sandbox user's current
    task count; ``fsize_mb``: largest file it may write; stdout/stderr are kept up to ``max_output`` characters.
    ``isolation``: "bwrap" (default, or ``$NANOSEEK_SANDBOX``) or "layers"; raises :class:`SandboxUnavailable` when
    bwrap is requested but unusable."""
    tests = [tests] if isinstance(tests, str) else list(tests)
    isolation = isolation or os.environ.get("NANOSEEK_SANDBOX") or "bwrap"
    if isolation not in ISOLATIONS:
        raise ValueError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
    bwrap, mode = _bwrap_mode() if isolation == "bwrap" else (None, "")
    if isolation == "bwrap" and bwrap is None:
        raise SandboxUnavailable(f"{mode}. Pass isolation='layers' or set NANOSEEK_SANDBOX=layers to run with "
                                 "best-effort protections only (not safe for hostile code).")
    if isolation == "layers":
        _warn_layers()
    root_user = sys.platform == "linux" and os.geteuid() == 0  # identity changes are Linux-only here
    read_only = list(_read_only_paths())
    if bwrap:  # also readable there: the /bin, /lib... links, and the sandbox's private /proc and minimal /dev
        read_only += [p for _, p in _system_links()] + ["/proc", "/dev"]
    drop_uid = bool(bwrap) and mode == "root" or (
        isolation == "layers" and root_user and all(map(_readable_by_others, read_only)))
    sandbox_uid = SANDBOX_UID if drop_uid else os.getuid() if hasattr(os, "getuid") else 0  # as the host counts

    root = tempfile.mkdtemp(prefix="nanoseek-sandbox-")
    dirs = {"solution": os.path.join(root, "solution"), "tests": os.path.join(root, "tests")}
    t0 = time.monotonic()
    procs: dict[str, subprocess.Popen] = {}
    pipes: list[int] = []
    try:
        for d in dirs.values():
            os.mkdir(d, 0o700)
        with open(os.path.join(dirs["solution"], "solution.py"), "w", encoding="utf-8") as f:
            f.write(code)
        with open(os.path.join(dirs["tests"], "tests.json"), "w", encoding="utf-8") as f:
            json.dump(tests, f)
        if drop_uid:  # the directories belong to SANDBOX_UID; bwrap, root without capabilities, enters them first
            if not bwrap:
                os.chmod(root, 0o711)  # the solution reaches its own directory only
            for role, name in (("solution", "solution.py"), ("tests", "tests.json"))[: 2 if bwrap else 1]:
                os.chown(dirs[role], SANDBOX_UID, SANDBOX_GID)
                os.chmod(dirs[role], 0o711)
                os.chown(os.path.join(dirs[role], name), SANDBOX_UID, SANDBOX_GID)
        rlimits = {
            "RLIMIT_CPU": int(timeout) + 1, "RLIMIT_AS": memory_mb << 20, "RLIMIT_FSIZE": fsize_mb << 20,
            "RLIMIT_CORE": 0, "RLIMIT_NPROC": _user_tasks(sandbox_uid) + max_threads + 4,
        }
        names = ("s_out", "s_err", "t_out", "t_err", "results")
        files: dict[str, IO[bytes]] = {  # the parent's alone (0600): neither sandbox can open them by name
            n: open(os.open(os.path.join(root, n), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600), "w+b") for n in names}
        try:
            req_r, req_w = os.pipe()
            resp_r, resp_w = os.pipe()
            pipes = [req_r, req_w, resp_r, resp_w]
            roles = {
                "solution": (_SOLUTION_HARNESS, [req_r, resp_w], files["s_out"], files["s_err"]),
                "tests": (_TEST_HARNESS, [req_w, resp_r, files["results"].fileno()], files["t_out"], files["t_err"]),
            }
            for role, (harness, fds, out, err) in roles.items():
                work = _MOUNT if bwrap else dirs[role]
                identity = ([SANDBOX_UID, SANDBOX_GID] if drop_uid and (bwrap or role == "solution")
                            else "caps" if root_user and not bwrap else None)
                cfg = {"rlimits": rlimits, "identity": identity, "fds": fds, "max_message": MAX_MESSAGE,
                       "read": read_only}
                argv = _python() + ["-c", harness, json.dumps(cfg)]
                if bwrap:
                    argv = _bwrap_argv(bwrap, mode, dirs[role]) + argv
                procs[role] = subprocess.Popen(
                    argv, cwd=dirs[role], env=_env(work), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                    pass_fds=fds, start_new_session=True,
                )
            for fd in pipes:
                os.close(fd)
            pipes = []
            timed_out = not _wait(procs["tests"], timeout - (time.monotonic() - t0))
            if not timed_out:  # the solution process exits when the test process closes its channel
                _wait(procs["solution"], min(0.5, timeout - (time.monotonic() - t0)))
            for proc in procs.values():
                _stop(proc, bool(bwrap))
            returncode = procs["solution"].returncode
            procs = {}
            reports = _read_reports(files["results"])
            stdout = _tail([files["s_out"], files["t_out"]], max_output)
            stderr = _tail([files["s_err"], files["t_err"]], max_output)
        finally:
            for f in files.values():
                f.close()
    finally:
        for fd in pipes:
            os.close(fd)
        for proc in procs.values():
            _stop(proc, bool(bwrap))
        _remove(root)
    ran = any(r.get("code") is True for r in reports)
    passed = len({r["test"] for r in reports if isinstance(r.get("test"), int) and r.get("ok") is True})
    protections = next((tuple(r["protections"]) for r in reports if "protections" in r), ())
    if bwrap:
        protections = ("bwrap", "netns", "pidns", "mountns") + protections
    return SandboxResult(ran=ran, passed=min(passed, len(tests)), total=len(tests), timed_out=timed_out,
                         returncode=returncode, stdout=stdout, stderr=stderr, wall_s=time.monotonic() - t0,
                         protections=protections)


def _read_reports(f: IO[bytes]) -> list[dict]:
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


def _tail(files: list[IO[bytes]], n: int) -> str:
    parts = []
    for f in files:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - 4 * n))
        parts.append(f.read().decode("utf-8", "replace")[-n:])
    return "".join(parts)[-n:]


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
    ``memory_mb`` / ``max_threads`` / ``fsize_mb`` / ``isolation`` are passed to run_code; other fields are
    ignored."""
    code = extract_code(completion)
    if code is None:
        return 0.0
    limits = {k: fields[k] for k in ("memory_mb", "max_threads", "fsize_mb", "isolation") if k in fields}
    result = run_code(code, tests, timeout=timeout, **limits)
    if partial:
        return result.fraction
    return float(result.ran and result.passed == result.total)
