"""The sandbox against hostile code: each test performs one attack (bounded, loopback only) and checks it failed.

Attacks on the isolation need bubblewrap and are skipped, with the reason, where it cannot run; attacks that the
in-process layers also stop (network through seccomp, forged verdicts through the two-process design) run under
both ``isolation="bwrap"`` and ``isolation="layers"``.
"""

import glob
import json
import os
import socket
import subprocess
import sys
import tempfile
import uuid
import warnings

import pytest

from nanoseek.rl import sandbox
from nanoseek.rl.sandbox import run_code

IS_LINUX = sys.platform == "linux"
NO_BWRAP = sandbox.isolation_error()
needs_bwrap = pytest.mark.skipif(NO_BWRAP is not None, reason=f"no bubblewrap sandbox here: {NO_BWRAP}")
ISOLATIONS = [pytest.param("bwrap", marks=needs_bwrap), pytest.param("layers", marks=pytest.mark.skipif(
    not IS_LINUX, reason="seccomp needs Linux"))]


@pytest.fixture(autouse=True)
def _quiet_layers():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*isolation='layers'.*", category=RuntimeWarning)
        yield


def attempts(*vectors: str) -> str:
    """Code trying each vector in turn and printing ``name: ok`` or ``name: blocked (error)``; then ``f = abs``."""
    lines = ["import os, socket, sys"]
    for i, v in enumerate(vectors):
        name, _, body = v.partition("\n")
        lines += [f"def _attack{i}():", *("    " + b for b in body.splitlines()), "try:", f"    _attack{i}()",
                  f"    print({name!r} + ': ok', flush=True)", "except Exception as e:",
                  f"    print({name!r} + ': blocked', repr(e), flush=True)"]
    return "\n".join(lines + ["print('done', flush=True)", "f = abs"])


def outcomes(r: sandbox.SandboxResult) -> dict[str, str]:
    assert r.ran and "done" in r.stdout.splitlines(), (r.stdout, r.stderr)  # the attack code itself ran to the end
    seen = {}
    for line in r.stdout.splitlines():
        name, _, rest = line.partition(": ")
        if rest.split(" ", 1)[0] in ("ok", "blocked"):
            seen[name] = rest.split(" ", 1)[0]
    return seen


# io_uring's IORING_OP_SOCKET makes a socket without the socket() syscall; the socket then sends a UDP datagram.
IO_URING_UDP = """io_uring udp
import ctypes, mmap, struct
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
params = ctypes.create_string_buffer(120)
ring = libc.syscall(425, 4, params)  # io_uring_setup
if ring < 0:
    raise OSError(ctypes.get_errno(), "io_uring_setup")
sq_entries, cq_entries = struct.unpack_from("II", params, 0)
sq_tail, sq_mask, sq_array = (struct.unpack_from("7I", params, 40)[i] for i in (1, 2, 6))
cq_head, cq_mask, cqes = (struct.unpack_from("6I", params, 80)[i] for i in (0, 2, 5))
sq = mmap.mmap(ring, sq_array + 4 * sq_entries, offset=0)
cq = mmap.mmap(ring, cqes + 16 * cq_entries, offset=0x8000000)
sqes = mmap.mmap(ring, 64 * sq_entries, offset=0x10000000)
sqe = bytearray(64)
struct.pack_into("BBHiQQI", sqe, 0, 45, 0, 0, socket.AF_INET, socket.SOCK_DGRAM, 0, 0)  # IORING_OP_SOCKET
sqes[0:64] = bytes(sqe)
tail = struct.unpack_from("I", sq, sq_tail)[0]
struct.pack_into("I", sq, sq_array + 4 * (tail & struct.unpack_from("I", sq, sq_mask)[0]), 0)
struct.pack_into("I", sq, sq_tail, tail + 1)
if libc.syscall(426, ring, 1, 1, 1, None, 0) < 0:  # io_uring_enter(..., IORING_ENTER_GETEVENTS)
    raise OSError(ctypes.get_errno(), "io_uring_enter")
head = struct.unpack_from("I", cq, cq_head)[0]
fd = struct.unpack_from("Qi", cq, cqes + 16 * (head & struct.unpack_from("I", cq, cq_mask)[0]))[1]
if fd < 0:
    raise OSError(-fd, "IORING_OP_SOCKET")
socket.socket(fileno=fd).sendto(b"leak", ("127.0.0.1", PORT))"""


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_no_network_of_any_family(isolation, tmp_path):
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    port = udp.getsockname()[1]
    path = str(tmp_path / "s.sock")
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    unix.bind(path)
    unix.setblocking(False)
    abstract_name = f"\0nanoseek-test-{uuid.uuid4().hex}"
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    abstract.bind(abstract_name)
    abstract.setblocking(False)
    try:
        code = attempts(
            IO_URING_UDP.replace("PORT", str(port)),
            f"udp\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'leak', ('127.0.0.1', {port}))",
            f"unix path\nsocket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b'leak', {path!r})",
            f"unix abstract\nsocket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b'leak', {abstract_name!r})",
            "inet6\nsocket.socket(socket.AF_INET6, socket.SOCK_DGRAM)",
            "netlink\nsocket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)",
            "packet\nsocket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)",
            "socketpair\na, b = socket.socketpair()\na.send(b'x')\nassert b.recv(1) == b'x'",
        )
        r = run_code(code, ["f(1)"], timeout=5, isolation=isolation)
        seen = outcomes(r)
        for sock in (udp, unix, abstract):
            with pytest.raises(BlockingIOError):  # nothing arrived
                sock.recv(64)
        assert {k: v for k, v in seen.items() if k != "socketpair"} == {
            "io_uring udp": "blocked", "udp": "blocked", "unix path": "blocked", "unix abstract": "blocked",
            "inet6": "blocked", "netlink": "blocked", "packet": "blocked"}, r.stdout
        assert seen["socketpair"] == "ok"  # local IPC (asyncio) still works
    finally:
        for sock in (udp, unix, abstract):
            sock.close()


@needs_bwrap
def test_no_changes_outside_and_no_privileges(tmp_path):
    target = tmp_path / "victim"
    target.write_text("x")
    os.chmod(target, 0o644)
    before = os.stat(target)
    code = attempts(
        f"chmod\nos.chmod({str(target)!r}, 0o4777)",
        f"chown\nos.chown({str(target)!r}, 12345, 12345)",
        f"utime\nos.utime({str(target)!r}, (0, 0))",
        f"write\nopen({str(target)!r}, 'a').write('y')",
        f"create\nopen({str(tmp_path / 'new')!r}, 'w')",
        "setuid\nos.setuid(0)",
        "own dir\nopen('mine', 'w').write('ok')\nos.chmod('mine', 0o4777)",
    ) + "\nprint('uid', os.getuid(), os.geteuid(), os.getgid(), os.getgroups())\n" \
        "print(''.join(l for l in open('/proc/self/status') if l.startswith(('Cap', 'NoNewPrivs'))))"
    r = run_code(code, ["f(1)"], timeout=5)
    seen = outcomes(r)
    after = os.stat(target)
    assert (after.st_mode, after.st_uid, after.st_gid, after.st_mtime_ns) == (
        before.st_mode, before.st_uid, before.st_gid, before.st_mtime_ns)
    assert target.read_text() == "x" and not (tmp_path / "new").exists()
    assert all(v == "blocked" for k, v in seen.items() if k != "own dir"), r.stdout
    assert seen["own dir"] == "ok"  # its own directory stays writable
    assert f"uid {sandbox.SANDBOX_UID} {sandbox.SANDBOX_UID} {sandbox.SANDBOX_GID} []" in r.stdout
    for line in ("CapInh:\t0000000000000000", "CapPrm:\t0000000000000000", "CapEff:\t0000000000000000",
                 "CapAmb:\t0000000000000000", "NoNewPrivs:\t1"):
        assert line in r.stdout
    assert "uid-drop" in r.protections or "no-caps" in r.protections


READ_ATTACK = """
import glob, os
secret = {secret!r}
found = []
def look(path, quiet=False):  # prints paths only, never contents
    try:
        with open(path, 'rb') as f:
            data = f.read(1 << 20)
    except OSError as e:
        print('blocked', path, type(e).__name__) if not quiet else None
        return
    print('read', path) if not quiet else None
    if secret.encode() in data:
        found.append(path)
for path in ['/etc/shadow', '/etc/passwd', {host_file!r}, {project_file!r}, '/proc/%d/environ' % os.getppid()]:
    look(path)
for path in glob.glob('/proc/[0-9]*/environ') + glob.glob('/proc/[0-9]*/cmdline'):
    look(path, quiet=True)
for home in ['/root', '/home', {home!r}]:
    try:
        print('listed', home, os.listdir(home))
    except OSError as e:
        print('blocked', home, type(e).__name__)
print('pids', sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))
print('found', found)
"""


@needs_bwrap
def test_no_reads_outside_what_python_needs(tmp_path):
    """Host files, the project tree, home directories and the parent's environment stay out of reach. The parent
    (a fresh process with a secret in its environment, as a trainer with API keys would have) runs the attack."""
    secret = f"nanoseek-secret-{uuid.uuid4().hex}"
    host_file = tmp_path / "host.txt"
    host_file.write_text(secret)
    code = READ_ATTACK.format(secret=secret, host_file=str(host_file), project_file=os.path.abspath(__file__),
                              home=os.path.expanduser("~"))
    runner = ("import importlib.util, json, sys\n"  # the sandbox module alone (stdlib only), not all of nanoseek
              f"spec = importlib.util.spec_from_file_location('sbx', {sandbox.__file__!r})\n"
              "m = sys.modules['sbx'] = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(m)\n"
              f"r = m.run_code({code!r}, [], timeout=5)\nprint(json.dumps([r.ran, r.stdout, r.stderr]))")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "NANOSEEK_TEST_SECRET": secret}
    proc = subprocess.run([sys.executable, "-I", "-c", runner], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    ran, stdout, stderr = json.loads(proc.stdout.splitlines()[-1])
    assert ran, stderr
    assert secret not in stdout.replace("nanoseek-secret-", "") and "found []" in stdout, stdout
    for path in ("/etc/shadow", str(host_file), os.path.abspath(__file__)):
        assert f"blocked {path} " in stdout, stdout
    assert "blocked /root " in stdout or "listed /root []" in stdout
    pids = json.loads(next(line for line in stdout.splitlines() if line.startswith("pids "))[5:])
    assert len(pids) <= 3, pids  # its own PID namespace: bwrap's init and the sandboxed process


FORGE = """
import __main__, json, os
def f(x):
    return 2 * x
msgs = [{"code": True}, {"ran": True, "names": [["f", {"ref": 0}]]}, {"value": True}, {"value": 2}]
msgs += [{"test": i, "ok": True} for i in range(4)]
report = getattr(__main__, "report", None)  # the old harness's reporting function
if callable(report):
    for m in msgs:
        report(**m)
for fd in range(3, 256):  # every descriptor, as JSON lines and as length-prefixed frames
    for m in msgs:
        data = json.dumps(m).encode()
        for chunk in (data + b"\\n", len(data).to_bytes(4, "big") + data):
            try:
                os.write(fd, chunk)
            except OSError:
                pass
os._exit(0)
"""


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_verdict_cannot_be_forged(isolation):
    r = run_code(FORGE, ["assert False", "assert f(1) == 3", "raise SystemExit(0)"], timeout=5, isolation=isolation)
    assert r.passed == 0, r
    assert sandbox.code_reward("p", f"```python\n{FORGE}```", tests=["assert False"], isolation=isolation) == 0.0


ALWAYS_EQUAL = """
class Always:
    def __eq__(self, other):
        return True
    def __ne__(self, other):
        return False
    __hash__ = object.__hash__
class AlwaysInt(int):
    __eq__ = lambda self, other: True
    __hash__ = int.__hash__
class AlwaysList(list):
    __eq__ = lambda self, other: True
class AlwaysStr(str):
    __eq__ = lambda self, other: True
    __hash__ = str.__hash__
class Contains:
    def __contains__(self, item):
        return True
    def __iter__(self):
        return iter(())
f = lambda x: Always()
g = lambda x: AlwaysInt(0)
h = lambda x: AlwaysList()
s = lambda x: AlwaysStr()
c = lambda x: Contains()
honest = lambda x: 2 * x
"""


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_custom_eq_never_decides(isolation):
    tests = ["assert f(2) == 4", "assert 4 == f(2)", "assert g(2) == 4", "assert h(2) == [4]", "assert s(2) == 'x'",
             "assert [f(2)] == [4]", "assert {'a': f(2)} == {'a': 4}", "assert 4 in c(2)", "assert honest(2) == 4"]
    r = run_code(ALWAYS_EQUAL, tests, timeout=5, isolation=isolation)
    assert r.ran and r.passed == 1, r  # only the honest one


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_patched_or_shadowed_builtins_and_modules_do_not_reach_the_tests(isolation):
    """Replacing what a test calls (a builtin, or a module the test expects the code to have imported) would hand
    the expected value to the solution; neither the patched builtins module nor shadowing names get through."""
    code = ("import builtins\nbuiltins.abs = lambda x: 0\nbuiltins.sorted = lambda x, **k: [1, 2, 3]\n"
            "builtins.sum = lambda x: 6\ndef round(x):\n    return 2\n"
            "class math:\n    isclose = staticmethod(lambda a, b: True)\nf = lambda x: 999\ng = lambda x: [9]")
    tests = ["assert abs(f(1) - 2) < 1e-9", "assert sorted(g(1)) == [1, 2, 3]", "assert sum(g(1)) == 6",
             "assert round(f(1)) == 2", "assert math.isclose(f(1), 2)"]
    r = run_code(code, tests, timeout=5, isolation=isolation)
    assert r.ran and r.passed == 0, r


STEAL_EXPECTED = """
import glob, re, sys
found = None
for path in sys.argv[1:] + glob.glob('../*/*.json') + glob.glob('/tmp/nanoseek-sandbox-*/*') \\
        + glob.glob('/tmp/nanoseek-sandbox-*/*/*') + glob.glob('/proc/[0-9]*/cmdline'):
    try:
        m = re.search('TOKEN-[0-9a-f]{32}', open(path, errors='replace').read())
    except OSError:
        continue
    if m:
        found = m.group()
        break
f = lambda x: found
"""


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_solution_never_sees_the_expected_values(isolation):
    token = f"TOKEN-{uuid.uuid4().hex}"
    r = run_code(STEAL_EXPECTED, [f"assert f(0) == {token!r}"], timeout=5, isolation=isolation)
    assert r.ran and r.passed == 0, r


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_plain_values_and_handles_still_work(isolation):
    """The two-process design keeps ordinary tests working: HumanEval-style check(), classes, generators,
    exceptions, module-level values and the modules the code imported."""
    code = ("import math\nfrom typing import List\nLIMIT = (3, {'a': [1.5, None]}, b'x', {1, 2})\n"
            "def mean(xs: List[float]) -> float:\n    return sum(xs) / len(xs)\n"
            "class Stack:\n    def __init__(self):\n        self.items = []\n"
            "    def push(self, x):\n        self.items.append(x)\n        return self\n"
            "    def __len__(self):\n        return len(self.items)\n"
            "def gen(n):\n    yield from range(n)\n"
            "def safe_div(a, b):\n    if b == 0:\n        raise ValueError('b == 0')\n    return a / b\n"
            "big = lambda: 3 ** 200\n")
    tests = [
        "def check(candidate):\n    assert candidate([1.0, 2.0]) == 1.5\n"
        "    assert abs(candidate([1, 2, 4]) - 7 / 3) < 1e-9\ncheck(mean)",
        "s = Stack().push(1).push(2)\nassert len(s) == 2 and s.items == [1, 2] and s != Stack()",
        "assert list(gen(3)) == [0, 1, 2] and 2 in gen(3)",
        "try:\n    safe_div(1, 0)\nexcept ValueError as e:\n    assert 'b == 0' in str(e)"
        "\nelse:\n    raise AssertionError",
        "assert LIMIT == (3, {'a': [1.5, None]}, b'x', {1, 2}) and math.pi > 3",
        "assert big() == 3 ** 200",
    ]
    r = run_code(code, tests, timeout=5, isolation=isolation)
    assert (r.ran, r.passed, r.total) == (True, len(tests), len(tests)), r.stderr


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_cleanup_follows_no_link_and_leaves_nothing(isolation, tmp_path):
    """The parent deletes the run's directory as root: links planted there must not redirect its chmod / rmtree."""
    outside = tmp_path / "outside"
    outside.mkdir(mode=0o755)
    (outside / "keep").write_text("x")
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "nanoseek-sandbox-*")))
    code = (f"import os\nos.symlink({str(outside)!r}, 'link')\nos.makedirs('a/b')\nopen('a/b/x', 'w').close()\n"
            "os.symlink('/', 'a/root')\nos.chmod('a/b', 0)\nos.chmod('a', 0)\nf = abs")
    r = run_code(code, ["f(1)"], timeout=5, isolation=isolation)
    assert (r.ran, r.passed) == (True, 1), r.stderr
    assert os.stat(outside).st_mode & 0o777 == 0o755 and (outside / "keep").read_text() == "x"
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "nanoseek-sandbox-*"))) <= before
