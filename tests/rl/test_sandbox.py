"""Code reward sandbox: good code scores, bad code scores 0 and never stalls or leaks processes."""

import os
import socket
import sys
import time
import warnings

import pytest

from nanoseek.rl import sandbox
from nanoseek.rl.sandbox import SandboxUnavailable, code_reward, extract_code, run_code

P = "Write f(x) returning 2 * x."
TESTS = ["assert f(2) == 4", "assert f(-1) == -2"]
IS_LINUX = sys.platform == "linux"


@pytest.fixture(autouse=True)
def _isolation(monkeypatch):
    """bubblewrap where it works (the default); elsewhere these tests run with the opt-in layers."""
    if sandbox.isolation_error() is not None:
        monkeypatch.setenv("NANOSEEK_SANDBOX", "layers")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*isolation='layers'.*", category=RuntimeWarning)
        yield


def answer(code: str) -> str:
    return f"<think>easy</think>\n<answer>\n```python\n{code}\n```\n</answer>"


def sandbox_processes() -> list[int]:
    """Live (non-zombie) processes still running a sandbox harness."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"nanoseek-sandbox-" in cmd and state != "Z":
            out.append(int(pid))
    return out


def test_extract_code():
    assert extract_code(answer("def f(x):\n    return 2 * x")) == "def f(x):\n    return 2 * x\n"
    assert extract_code("<think>```python\nbad\n```</think> ```py\nx = 1\n``` and ```\nx = 2\n```") == "x = 2\n"
    assert extract_code("<think>t</think> <answer>x = 3</answer>") == "x = 3"
    assert extract_code("<think>t</think> no code") is None


def test_pass_fail_syntax_and_partial():
    assert code_reward(P, answer("def f(x):\n    return 2 * x"), tests=TESTS) == 1.0
    assert code_reward(P, answer("def f(x):\n    return x + 2"), tests=TESTS) == 0.0  # f(2) ok, f(-1) fails
    assert code_reward(P, answer("def f(x):\n    return x + 2"), tests=TESTS, partial=True) == 0.5
    assert code_reward(P, answer("def f(x:\n    return 2 * x"), tests=TESTS) == 0.0
    assert code_reward(P, answer("raise RuntimeError('crash')\ndef f(x):\n    return 2 * x"), tests=TESTS) == 0.0
    assert code_reward(P, "<think>t</think> I cannot write code.", tests=TESTS) == 0.0
    r = run_code("print('hello')\nimport sys\nprint('oops', file=sys.stderr)", "assert 1 + 1 == 2")
    assert (r.ran, r.passed, r.total, r.timed_out) == (True, 1, 1, False)
    assert "hello" in r.stdout and "oops" in r.stderr
    # a leftover busy non-daemon thread does not hold the run open
    busy = "import threading\nthreading.Thread(target=lambda: [0 for _ in iter(int, 1)]).start()\nf = (2).__mul__"
    t = time.monotonic()
    assert code_reward(P, answer(busy), tests=TESTS, timeout=5) == 1.0
    assert time.monotonic() - t < 3


def test_infinite_loop_times_out():
    t = time.monotonic()
    r = run_code("while True:\n    pass", TESTS, timeout=1.0)
    elapsed = time.monotonic() - t
    assert r.timed_out and not r.ran and r.fraction == 0.0
    assert elapsed < 1.0 + 2.0
    assert not sandbox_processes()


def test_memory_bomb():
    assert code_reward(P, answer("x = bytearray(64 * 1024**3)\ndef f(x):\n    return 2 * x"), tests=TESTS) == 0.0
    grow = "a = []\nwhile True:\n    a.append(bytearray(10**7))"
    t = time.monotonic()
    assert code_reward(P, answer(grow), tests=TESTS, timeout=5, memory_mb=256) == 0.0
    assert time.monotonic() - t < 5 + 2


def test_fork_bomb_scores_zero_and_leaves_no_process():
    probe = run_code("pass")
    if os.geteuid() == 0 and "seccomp" not in probe.protections:
        pytest.skip("root without seccomp: RLIMIT_NPROC is not enforced, a fork bomb would not be contained")
    t = time.monotonic()
    assert code_reward(P, answer("import os\nwhile True:\n    os.fork()"), tests=TESTS, timeout=2) == 0.0
    assert time.monotonic() - t < 2 + 2
    assert code_reward(P, answer("import subprocess\nsubprocess.run(['true'])\nf = abs"), tests=["f(1)"]) == 0.0
    if IS_LINUX:
        assert not sandbox_processes()


def test_network_is_blocked():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\nconnected = True"
        assert code_reward(P, answer(code), tests=["assert connected"], timeout=3) == 0.0
        raw = f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))\nconnected = True"
        assert code_reward(P, answer(raw), tests=["assert connected"], timeout=3) == 0.0
        with pytest.raises(BlockingIOError):  # nobody connected
            server.accept()
    finally:
        server.close()
    # local IPC still works (asyncio needs a socketpair)
    assert code_reward(P, answer("import socket\na, b = socket.socketpair()\nf = abs"), tests=["f(1)"]) == 1.0


def test_writes_stay_inside_the_sandbox(tmp_path):
    probe = run_code("pass")
    if "bwrap" not in probe.protections and "landlock" not in probe.protections:
        pytest.skip("neither bubblewrap nor Landlock: file writes outside the sandbox directory are not blocked")
    target = tmp_path / "escaped.txt"
    code = f"open({str(target)!r}, 'w').write('x')\nf = abs"
    assert code_reward(P, answer(code), tests=["f(1)"]) == 0.0 and not target.exists()
    local = "open('scratch.txt', 'w').write('ok')\nf = lambda x: open('scratch.txt').read()"
    assert code_reward(P, answer(local), tests=["assert f(0) == 'ok'"]) == 1.0


def test_without_bubblewrap_it_refuses_unless_told(monkeypatch):
    monkeypatch.delenv("NANOSEEK_SANDBOX", raising=False)
    monkeypatch.setattr(sandbox, "_bwrap_mode", lambda: (None, "bubblewrap is not installed (test)"))
    assert sandbox.isolation_error() == "bubblewrap is not installed (test)"
    with pytest.raises(SandboxUnavailable, match="not installed.*isolation='layers'"):
        run_code("f = abs", ["f(1)"])
    with pytest.raises(ValueError, match="isolation"):
        run_code("f = abs", ["f(1)"], isolation="none")
    if IS_LINUX:  # the opt-in: layers only, with a warning
        with pytest.warns(RuntimeWarning, match="isolation='layers'"):
            sandbox._warn_layers.cache_clear()
            r = run_code("f = abs", ["assert f(-1) == 1"], isolation="layers")
        assert (r.ran, r.passed) == (True, 1) and "bwrap" not in r.protections and "seccomp" in r.protections
        monkeypatch.setenv("NANOSEEK_SANDBOX", "layers")
        assert code_reward(P, answer("def f(x):\n    return 2 * x"), tests=TESTS) == 1.0
