"""How every output is written: never over a file the inputs reference, never half-written.

Every command that writes goes through :class:`Output`. It is told what the inputs are (the
model and the files its external data lives in, a calibration set, a checkpoint folder), refuses
any output path that is or would replace one of them, stages everything under temporary names in
the destination directory, and renames only when all of it is complete; an exception, SIGINT or
SIGTERM at any point removes what was staged, directories it made included.

External data is never hard-linked or symlinked (onnx >= 1.17 refuses to load a tensor whose
file has more than one link, which would make the user's own model unloadable too). An output
in the input's directory references the input's data files where they are; an output elsewhere
gets a copy, made by the kernel (copy_file_range / sendfile) in bounded memory.
"""
from __future__ import annotations

import errno
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx

from ..errors import MoeExportError

CHUNK = 64 << 20  # bytes per copy call: bounds how long SIGINT waits, and the progress granularity

# The external-data location of an expert's own weight matrix (conversion/experts.py,
# --per-expert-weights), which Output.model writes when the model is saved, sliced one matrix at a
# time from the [E, a, b] table named by the tensor's "source".
EXPERT_SLICE = "moe_export:expert-slice"


def data_locations(model: onnx.ModelProto) -> list[str]:
    """Relative locations of the external-data files the model's tensors reference."""
    locs = []
    for t in _all_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if loc and loc not in locs:
                locs.append(loc)
    return locs


def check_output_parent(out: Path) -> None:
    """An output goes into an existing folder: none is made for it (a typo would be)."""
    parent = Path(out).parent if str(Path(out).parent) else Path(".")
    if not parent.is_dir():
        raise MoeExportError(f"output directory {parent} " + ("is not a directory" if parent.exists() else
                                                                "does not exist"))


def _escapes(folder: Path, loc: str) -> bool:
    """Whether a data file resolves outside `folder` (a symlink into a Hugging Face cache's
    blobs, say): onnxruntime refuses a model whose data does so."""
    real = os.path.realpath(folder)
    return os.path.commonpath([real, os.path.realpath(Path(folder) / loc)]) != real


def resolved_data(model: onnx.ModelProto, data_dir) -> tuple:
    """(model, data_dir) to hand onnxruntime for a model in memory whose data lives in
    `data_dir`: as given, or, where a data file resolves elsewhere, a copy of the graph pointing
    at the files where they resolve (their common folder), which onnxruntime accepts."""
    locs = data_locations(model)
    lexical = lambda loc: not os.path.isabs(loc) and ".." not in Path(loc).parts
    if not any(_escapes(Path(data_dir), loc) for loc in locs) or not all(map(lexical, locs)):
        return model, data_dir  # (a location that names a place outside is onnxruntime's to refuse)
    real = {loc: os.path.realpath(Path(data_dir) / loc) for loc in locs}
    base = os.path.commonpath([os.path.dirname(r) for r in real.values()])
    m = onnx.ModelProto()
    m.CopyFrom(model)  # (the weights are not in it: only their locations change)
    for t in _all_tensors(m):
        for e in t.external_data:
            if e.key == "location" and e.value in real:
                e.value = os.path.relpath(real[e.value], base)
    return m, base


def _all_tensors(model):
    yield from model.graph.initializer
    for n in model.graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                yield a.t


def model_files(path, model: onnx.ModelProto | None = None) -> list[Path]:
    """The model file and every data file it references (what a command must never overwrite)."""
    path = Path(path)
    if model is None:
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception:
            return [path]
    return [path] + [path.parent / loc for loc in data_locations(model)]


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: equal once resolved, or the same inode (links, mounts)."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def copy_file(src: Path, dst: Path, label: str | None = None) -> None:
    """Copies src to dst inside the kernel (see copy_into)."""
    with open(dst, "wb") as fo, Progress(f"copying {label or src.name}", os.path.getsize(src)) as bar:
        copy_into(src, fo, 0, bar)


def copy_into(src: Path, fo, at: int, bar=None, done_before=0) -> int:
    """Copies the file src into the open file fo at offset `at`, inside the kernel, CHUNK bytes
    a call (so SIGINT is served between calls and memory stays bounded). Returns bytes copied."""
    total = os.path.getsize(src)
    with open(src, "rb") as fi:
        fin, fout = fi.fileno(), fo.fileno()
        ways = [lambda n, off: os.copy_file_range(fin, fout, n, off, at + off),
                lambda n, off: (os.lseek(fout, at + off, os.SEEK_SET), os.sendfile(fout, fin, off, n))[1],
                lambda n, off: os.pwrite(fout, os.pread(fin, min(n, 8 << 20), off), at + off)]
        done = 0
        while done < total:
            try:
                n = ways[0](min(CHUNK, total - done), done)
            except OSError as e:  # this kernel or file system does not offer that way: the next one
                if e.errno not in _UNSUPPORTED or len(ways) == 1:
                    raise
                ways.pop(0)
                continue
            if n == 0:
                raise MoeExportError(f"{src}: file shrank while being copied")
            done += n
            if bar is not None:
                bar.update(done_before + done)
    return total


_UNSUPPORTED = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF}


class Progress:
    """A transient progress bar on stderr when it is a terminal and the work lasts over a second;
    silent otherwise (pipes, CI logs). MOE_EXPORT_PROGRESS=1 forces it, =0 turns it off."""

    def __init__(self, what: str, total: float | None = None, after: float = 1.0):
        self.what, self.total, self.after = what, total, after
        self.t0 = time.monotonic()
        self._bar = self._task = self._stream = None
        self._lock = threading.Lock()
        force = os.environ.get("MOE_EXPORT_PROGRESS")
        self.enabled = force == "1" or (force != "0" and sys.stderr.isatty())

    def __enter__(self):
        if self.enabled:  # a copy of stderr as it is now: exporters may redirect fd 2 meanwhile
            sys.stderr.flush()
            self._stream = os.fdopen(os.dup(sys.stderr.fileno()), "w")
        return self

    def _columns(self):
        from rich.progress import (BarColumn, DownloadColumn, SpinnerColumn, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)
        if self.total is None:
            return [SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()]
        if self.total > 4096:  # bytes
            return [TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn()]
        return [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:.0f}/{task.total:.0f}")]

    def update(self, done: float = 0) -> None:
        if not self.enabled:
            return
        with self._lock:
            if self._bar is None:
                if time.monotonic() - self.t0 < self.after or self._stream is None:
                    return
                from rich.console import Console
                from rich.progress import Progress as Bar

                self._bar = Bar(*self._columns(), console=Console(file=self._stream, force_terminal=True),
                                transient=True)
                self._bar.start()
                self._task = self._bar.add_task(self.what, total=self.total)
            self._bar.update(self._task, completed=done)

    def __exit__(self, *exc):
        with self._lock:
            if self._bar is not None:
                self._bar.stop()
            if self._stream is not None:
                self._stream.close()
            self._stream = None
        return False


class Spinner(Progress):
    """Progress of work that reports no steps (an exporter): shown after a second, with the time."""

    def __enter__(self):
        super().__enter__()
        if self.enabled:
            self._timer = threading.Timer(self.after, self.update)
            self._timer.daemon = True
            self._timer.start()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self._timer.cancel()
        return super().__exit__(*exc)


@contextmanager
def _signals_held(pending: list):
    """SIGINT/SIGTERM wait while the staged files are renamed into place (a few syscalls), so an
    interrupt leaves either the old state or the new one: their handlers only note the signal in
    `pending` meanwhile (see _deliver). Blocking the signals instead would hold them in this thread
    only; the kernel hands a process's signal to any thread that does not block it (onnxruntime's
    pool), and Python then raises in this one, mid-commit."""
    old = {}
    if threading.current_thread() is threading.main_thread():  # (elsewhere no handler runs in it)
        for signo in (signal.SIGINT, signal.SIGTERM):
            old[signo] = signal.signal(signo, lambda n, frame: pending.append(n))
    try:
        yield
    finally:
        for signo, handler in old.items():
            signal.signal(signo, signal.SIG_DFL if handler is None else handler)  # (None: set outside Python)


def _deliver(pending: list) -> None:
    """Runs the handler of an interrupt held during a commit, here (it raises, in Python's and
    moe-export's handlers), so the commit's caller knows it came after the output was in place."""
    for signo in pending[:1]:
        handler = signal.getsignal(signo)
        if callable(handler):
            handler(signo, None)
        elif handler == signal.SIG_DFL:
            signal.raise_signal(signo)


class Output:
    """Stages the files of one output and commits them together.

        with Output(protected=model_files(src)) as out:
            out.model(model, dst, src.parent)
        # committed here; on any exception nothing staged is left behind

    `protected`: files the inputs reference; no output path may be one of them.
    """

    def __init__(self, protected=()):
        self.protected = [Path(p) for p in protected]
        self.staged: list[tuple[Path, Path]] = []  # (temporary, final)
        self.made_dirs: list[Path] = []  # kept once committed
        self.scratch: list[Path] = []    # removed in any case
        self.dirs: list[tuple[Path, Path]] = []  # (scratch directory, final), renamed after the files
        self.notes: list[str] = []  # what the user should know about the result (shared data, ...)

    # -- checks -------------------------------------------------------------------------------
    def check(self, path: Path, what="output") -> None:
        """Refuses a path that is, or would replace, one of the inputs' files."""
        for p in self.protected:
            if same_file(path, p):
                raise MoeExportError(f"{what} {path} would replace the input file {p}; "
                                     "moe-export never modifies its inputs")

    def check_model_path(self, out: Path) -> None:
        """Checks an output model's path before any work is done."""
        out = Path(out)
        if out.is_dir():
            raise MoeExportError(f"output {out} is a directory; give a file name")
        check_output_parent(out)
        self.check(out)
        self.check_unreferenced(out, out)

    def check_replaceable(self, path: Path, replacing: Path) -> None:
        """A data file for the model at `replacing` may take `path` if nothing is there, or if it
        is the data of the earlier model at `replacing` and of no other model."""
        self.check(path)
        self.check_unreferenced(path, replacing)
        if path.exists() or path.is_symlink():
            if path.resolve() not in set(_previous_data(Path(replacing))):
                raise MoeExportError(f"{path} exists and is not data of the output being replaced; "
                                     "choose another output name or directory")

    def check_unreferenced(self, path: Path, replacing: Path) -> None:
        """Refuses to replace a file that another model beside it keeps its data in (`replacing`,
        the model being overwritten, may reference it)."""
        if not (path.exists() or path.is_symlink()):
            return
        for m in sorted(path.parent.glob("*.onnx")):
            if same_file(m, replacing) or same_file(m, path):
                continue
            if any(same_file(d, path) for d in model_files(m)[1:]):
                raise MoeExportError(f"{path} holds the external data of {m}; choose another output name")

    # -- staging ------------------------------------------------------------------------------
    def mkdir(self, path: Path) -> Path:
        """Makes `path` and missing parents, readable by others as the umask allows; removed again
        if the output is not committed."""
        path = Path(path)
        missing = []
        p = path
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            d.mkdir()
            self.made_dirs.append(d)
        return path

    def temp_dir(self, parent: Path, prefix: str) -> Path:
        """A scratch directory beside the outputs (renames from it stay on one file system)."""
        d = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        os.chmod(d, 0o777 & ~_umask())  # mkdtemp's 0700 would keep a server's user out
        self.scratch.append(d)
        return d

    def directory(self, final: Path) -> Path:
        """A directory filled in a scratch place and renamed to `final` (which must not exist)
        once everything in it is complete."""
        final = Path(final)
        if final.exists():
            raise MoeExportError(f"{final} exists; remove it or choose another name")
        d = self.temp_dir(self.mkdir(final.parent), f".{final.name}.")
        self.dirs.append((d, final))
        return d

    def temp(self, final: Path) -> Path:
        """A staged temporary beside `final`, for a writer that wants a path; renamed on commit."""
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 is not what a user expects
        self.staged.append((Path(tmp), final))
        return Path(tmp)

    def file(self, final: Path, data: bytes) -> None:
        self.temp(Path(final)).write_bytes(data)

    def copy(self, src: Path, final: Path, label=None) -> None:
        final = Path(final)
        self.check(final)
        tmp = self.temp(final)
        copy_file(src, tmp, label)
        if os.stat(src).st_mode & 0o111:  # libraries and tools stay executable
            os.chmod(tmp, 0o777 & ~_umask())

    def move(self, src: Path, final: Path) -> None:
        """For a file this command made itself (an exporter's scratch output)."""
        final = Path(final)
        self.check(final)
        tmp = self.temp(final)
        os.replace(src, tmp)

    def model(self, model: onnx.ModelProto, out: Path, src_dir: Path, owned=False) -> None:
        """Stages `model` at `out` with its external data valid beside it. `src_dir`: where the
        data files are now. owned=True: they are this command's own scratch files (moved)."""
        out, src_dir = Path(out), Path(src_dir)
        out_dir = out.parent if str(out.parent) else Path(".")
        # relative, inside src_dir (load_model checked them); expert slices are written below
        locs = [loc for loc in data_locations(model) if loc != EXPERT_SLICE]
        self.check_model_path(out)
        # Shared only where onnxruntime will load it: data symlinked out of the folder is copied.
        in_place = not owned and same_file(out_dir, src_dir) and not any(_escapes(out_dir, loc) for loc in locs)
        if owned:
            for loc in locs:
                dst = out_dir / loc
                self.check_replaceable(dst, out)
                self.mkdir(dst.parent)
                self.move(src_dir / loc, dst)
        elif locs and in_place:
            self.notes.append(f"shares external data {', '.join(locs)} with the input (keep it beside both)")
        elif locs:
            name = self._gather_data(model, locs, src_dir, out)
            self.notes.append(f"external data copied to {name}")
        slices = [t for t in _all_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL
                  and any(e.key == "location" and e.value == EXPERT_SLICE for e in t.external_data)]
        if slices:
            self.notes.append(f"each expert's weights written to {self._expert_slices(slices, src_dir, out)}")
        self.file(out, model.SerializeToString())

    def _expert_slices(self, tensors, src_dir: Path, out: Path) -> str:
        """Writes each expert matrix (experts.expert_weight) into OUT.experts.data, read from its
        table in the input's data one matrix at a time, transposed where asked."""
        name = out.name + ".experts.data"
        dst = out.parent / name
        self.check_replaceable(dst, out)
        at = 0
        with open(self.temp(dst), "r+b") as fo, Progress(f"writing expert weights to {name}", len(tensors)) as bar:
            for j, t in enumerate(tensors):
                info = {e.key: e.value for e in t.external_data}
                rows, cols = int(info["rows"]), int(info["cols"])
                size = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
                with open(src_dir / info["source"], "rb") as fi:
                    raw = os.pread(fi.fileno(), rows * cols * size, int(info["offset"]))
                if len(raw) != rows * cols * size:
                    raise MoeExportError(f"{src_dir / info['source']}: shorter than its tensors say")
                w = np.frombuffer(raw, dtype=f"u{size}").reshape(rows, cols)  # bytes, whatever the type
                data = np.ascontiguousarray(w.T if info["transpose"] == "1" else w).tobytes()
                fo.seek(at)
                fo.write(data)
                del t.external_data[:]
                for k, v in (("location", name), ("offset", str(at)), ("length", str(len(data)))):
                    t.external_data.add(key=k, value=v)
                at = -(-(at + len(data)) // 4096) * 4096
                bar.update(j + 1)
        return name

    def _gather_data(self, model, locs, src_dir: Path, out: Path) -> str:
        """Copies the data files into one file named after the output and points the tensors at
        it: no name can clash with another output's data, nor be the output itself."""
        name = out.name + ".data"
        dst = out.parent / name
        self.check_replaceable(dst, out)
        srcs = [src_dir / loc for loc in locs]
        total = sum(os.path.getsize(f) for f in srcs)
        base, at = {}, 0
        with open(self.temp(dst), "r+b") as fo, Progress(f"copying external data to {name}", total) as bar:
            for loc, f in zip(locs, srcs):
                base[loc] = at
                at += copy_into(f, fo, at, bar, at)
                at = -(-at // 4096) * 4096  # each file's tensors keep their alignment
        for t in _all_tensors(model):
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in t.external_data}
            if info["location"] not in base:  # an expert slice, written after
                continue
            info["offset"] = str(base[info["location"]] + int(info.get("offset", 0)))
            info["location"] = name
            del t.external_data[:]
            for k, v in info.items():
                t.external_data.add(key=k, value=v)
        return name

    # -- commit / roll back -------------------------------------------------------------------
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            done, pending = False, []
            try:
                with _signals_held(pending):
                    for tmp, final in self.staged:
                        os.replace(tmp, final)
                    for d, final in self.dirs:
                        os.rename(d, final)
                    done = True
                _deliver(pending)
            except BaseException as e:
                # An interrupt held during the renames is raised just after them: the output
                # stays, and the interrupt says so (cli.main reports it written, not "nothing").
                if not done:
                    self.rollback()
                e.output_committed = done
                raise
            finally:
                if done:
                    for d in self.scratch:
                        shutil.rmtree(d, ignore_errors=True)
            return False
        if exc is not None:  # an output staged inside this one is rolled back with it
            exc.output_committed = False
        self.rollback()
        return False

    def rollback(self) -> None:
        for tmp, _ in self.staged:
            tmp.unlink(missing_ok=True)
        for d in reversed(self.scratch + self.made_dirs):
            shutil.rmtree(d, ignore_errors=True)
        self.staged, self.made_dirs, self.scratch, self.dirs = [], [], [], []


def _previous_data(out: Path) -> list[Path]:
    """Data files referenced by an earlier output at `out`: replacing that output may replace them."""
    if not out.is_file():
        return []
    try:
        m = onnx.load(str(out), load_external_data=False)
    except Exception:
        return []
    return [(out.parent / loc).resolve() for loc in data_locations(m)]


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m
