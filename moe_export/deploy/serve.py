"""`moe-export serve REPO`: a real Triton Inference Server for a Python-backend repository, on
127.0.0.1, from PyPI's nvidia-pytriton wheel installed in a serving environment.

What the wheel lacks is supplied here: the Python backend needs its stub beside
libtriton_python.so (the wheel keeps stubs per Python version elsewhere), and the stub embeds an
isolated interpreter that ignores PYTHONPATH but reads the pyvenv.cfg of the first `python3` on
PATH, so the environment's bin goes first there. The server runs in its own process group, with
the backend's shared-memory files under a prefix of ours, so a stop (Ctrl-C, SIGTERM, or the
server dying) leaves neither backend stubs nor /dev/shm files behind."""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from ..errors import MoeExportError, UsageError

SHM = Path("/dev/shm")
SHM_PREFIX = "moe_export_triton_"


class Environment:
    """The Python the models run in, and the server that comes with it: a virtual environment
    holding nvidia-pytriton (its tritonserver, Python backend and stubs) with numpy < 2 (the
    wheel's stubs are built against numpy 1: with numpy 2 they hand models garbage), onnxruntime,
    and onnxruntime-genai for GenAI folders. moe-export itself is not needed there."""

    def __init__(self, prefix):
        self.prefix = Path(prefix).resolve()
        site = sorted(self.prefix.glob("lib/python3.*/site-packages"))
        if not (self.prefix / "bin" / "python3").exists() or not site:
            raise UsageError(f"{prefix}: not a Python virtual environment (no bin/python3, lib/python3.*/site-packages)")
        self.site = site[-1]
        self.version = self.site.parent.name[len("python"):]
        self.root = self.site / "pytriton" / "tritonserver"
        if not (self.root / "bin" / "tritonserver").is_file():
            raise MoeExportError(f"{prefix} has no Triton server: {self.prefix}/bin/pip install nvidia-pytriton==0.7.0")
        numpy = [d.name.split("-")[1] for d in self.site.glob("numpy-*.dist-info")]
        if not numpy or int(numpy[0].split(".")[0]) >= 2:
            raise MoeExportError(f"{prefix}: the Triton wheel's Python backend needs numpy < 2 there, found "
                                 f"{numpy[0] if numpy else 'none'}: {self.prefix}/bin/pip install 'numpy<2'")
        cfg = self.prefix / "pyvenv.cfg"
        home = next((ln.split("=", 1)[1].strip() for ln in cfg.read_text().splitlines()
                     if ln.split("=")[0].strip() == "home"), None) if cfg.is_file() else None
        # the stub loads the libpython of the environment's base interpreter, not the system's
        self.libdir = Path(home).parent / "lib" if home else None

    def backends(self, into: Path) -> Path:
        """A backend directory whose python/ holds the stub for this environment's Python."""
        stub = self.root / "python_backend_stubs" / self.version / "triton_python_backend_stub"
        if not stub.is_file():
            raise MoeExportError(f"the Triton wheel has no Python backend stub for Python {self.version}")
        py = into / "python"
        py.mkdir(parents=True)
        for f in (self.root / "backends" / "python").iterdir():
            if f.is_file():
                shutil.copy2(f, py / f.name)  # the backend loads the stub from its own directory
        shutil.copy2(stub, py / stub.name)
        return into

    def variables(self) -> dict:
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        env.pop("PYTHONHOME", None)
        env["PATH"] = os.pathsep.join([str(self.prefix / "bin"), env.get("PATH", "")])
        libs = [str(self.libdir or ""), str(self.site / "nvidia_pytriton.libs"), env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs if p)
        return env


def find_environment(explicit=None) -> Environment:
    """--env, else $MOE_EXPORT_SERVE_ENV, else this interpreter's environment."""
    where = explicit or os.environ.get("MOE_EXPORT_SERVE_ENV") or sys.prefix
    try:
        return Environment(where)
    except MoeExportError as e:
        if explicit or os.environ.get("MOE_EXPORT_SERVE_ENV"):
            raise
        raise MoeExportError(f"{e}. Or make a serving environment: python3 -m venv serve-env && serve-env/bin/pip "
                             "install nvidia-pytriton==0.7.0 onnxruntime onnxruntime-genai, then --env serve-env") from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent():
    """Runs in the server's child process: SIGTERM it when `moe-export serve` dies, even by SIGKILL."""
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _clean_stale_shm():
    """Shared-memory files of servers whose `moe-export serve` is gone (a SIGKILL of both leaves them)."""
    for f in SHM.glob(SHM_PREFIX + "*"):
        pid = f.name[len(SHM_PREFIX):].split("_", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            f.unlink(missing_ok=True)


class Server:
    """A running tritonserver. start() waits until it is ready; stop() ends it and its stubs."""

    def __init__(self, repo, http_port=0, grpc_port=0, metrics_port=0, env=None, log=None, extra_args=()):
        self.repo = Path(repo).resolve()
        if not self.repo.is_dir() or not any(self.repo.glob("*/config.pbtxt")):
            raise UsageError(f"{repo}: not a Triton model repository (no NAME/config.pbtxt inside)")
        self.env = find_environment(env)
        self.ports = {"http": http_port or free_port(), "grpc": grpc_port or free_port(),
                      "metrics": metrics_port or free_port()}
        self.log, self.extra_args, self.proc, self._tmp, self.shm_prefix = log, list(extra_args), None, None, None

    @property
    def http_url(self):
        return f"http://127.0.0.1:{self.ports['http']}"

    @property
    def grpc_url(self):
        return f"127.0.0.1:{self.ports['grpc']}"

    def start(self, timeout=120.0):
        _clean_stale_shm()
        for kind, port in self.ports.items():
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    raise MoeExportError(f"port {port} ({kind}) is in use on 127.0.0.1: give another or 0 for a free one")
        self._tmp = tempfile.mkdtemp(prefix="moe_export_triton_")
        # the Python backend's regions under a name of ours, removable once this process is gone
        self.shm_prefix = f"{SHM_PREFIX}{os.getpid()}_{Path(self._tmp).name[-8:]}_"
        args = [str(self.env.root / "bin" / "tritonserver"), f"--model-repository={self.repo}", "--disable-auto-complete-config",
                "--allow-gpu-metrics=false", "--exit-on-error=true",
                "--http-address=127.0.0.1", f"--http-port={self.ports['http']}",
                "--grpc-address=127.0.0.1", f"--grpc-port={self.ports['grpc']}",
                "--metrics-address=127.0.0.1", f"--metrics-port={self.ports['metrics']}",
                f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
                f"--backend-directory={self.env.backends(Path(self._tmp) / 'backends')}"]
        self.log_file = Path(self.log) if self.log else Path(self._tmp) / "server.log"
        out = open(self.log_file, "ab")
        self.proc = subprocess.Popen(args + self.extra_args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=self.env.variables(), preexec_fn=_die_with_parent)
        out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                msg = f"the Triton server exited (code {self.proc.returncode}) before it was ready: {self.failure()}"
                self.stop()
                raise MoeExportError(msg)
            if self.ready():
                return self
            time.sleep(0.2)
        msg = f"the Triton server was not ready within {timeout:.0f} s: {self.failure()}"
        self.stop()
        raise MoeExportError(msg)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.http_url + "/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def failure(self) -> str:
        """The server log's most telling line (a model that failed to load, a missing backend)."""
        try:
            lines = [ln.strip() for ln in self.log_file.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return "no log"
        keys = ("failed to load", "UNAVAILABLE", "error", "Error")
        hits = [ln for ln in lines if any(k in ln for k in keys) and "CUDA" not in ln and "GPU" not in ln]
        return (hits[0] if hits else lines[-1] if lines else "no log")[:400]

    def stop(self, grace=15.0):
        """SIGTERM, then SIGKILL of the whole process group (stubs included) after `grace` seconds;
        our shared-memory files removed. Safe to call twice."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # stubs a SIGKILLed server orphaned, or a hung stop
            except ProcessLookupError:
                pass
            self.proc.wait()
            for f in SHM.glob(self.shm_prefix + "*"):
                f.unlink(missing_ok=True)
            self.proc = None
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


@contextmanager
def _stop_on(signals):
    """Turns the given signals into KeyboardInterrupt so one cleanup path serves Ctrl-C and SIGTERM."""
    def raise_(signum, frame):
        raise KeyboardInterrupt
    old = {s: signal.signal(s, raise_) for s in signals}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def serve(repo, http_port=0, grpc_port=0, metrics_port=0, env=None, log=None, timeout=120.0, extra_args=()):
    """Starts the server, prints its URLs and waits until Ctrl-C or SIGTERM."""
    server = Server(repo, http_port, grpc_port, metrics_port, env, log, extra_args)
    with _stop_on((signal.SIGTERM, signal.SIGHUP)):
        try:
            server.start(timeout)
            models = sorted(p.parent.name for p in server.repo.glob("*/config.pbtxt"))
            print(f"Triton Inference Server (from {server.env.prefix}) serving "
                  f"{', '.join(models)} from {server.repo}\n"
                  f"  HTTP     {server.http_url}  (e.g. {server.http_url}/v2/models/{models[0]})\n"
                  f"  gRPC     {server.grpc_url}\n"
                  f"  metrics  http://127.0.0.1:{server.ports['metrics']}/metrics\n"
                  f"  log      {server.log_file if log else 'kept until stop'}\n"
                  "Ctrl-C or SIGTERM stops it.", flush=True)
            code = server.proc.wait()
            raise MoeExportError(f"the Triton server exited with code {code}: {server.failure()}")
        except KeyboardInterrupt:
            print("Triton server stopping", file=sys.stderr)
        finally:
            server.stop()
