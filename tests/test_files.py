"""A user's files survive every command, and what moe-export writes loads in every ONNX tool."""
import hashlib
import os
import pty
import resource
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from moe_export.model.graph import reads_of

import moe_export
from helpers import FAMILY_GRAPHS, GRAPHS, ROOT, benchmark, input_feeds, run_cli

make_graph = benchmark("scale").make_graph

MIXTRAL = next(p for p in FAMILY_GRAPHS if p.stem == "mixtral")
EXE = Path(sys.executable).parent / "moe-export"


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def snapshot(d):
    """Every file under d with its content hash (what must not change)."""
    return {str(p.relative_to(d)): digest(p) for p in sorted(Path(d).rglob("*")) if p.is_file()}


def save_external(folder, size_threshold=1024):
    folder.mkdir(exist_ok=True)
    onnx.save(onnx.load(str(MIXTRAL)), str(folder / "m.onnx"), save_as_external_data=True,
              location="m.onnx.data", size_threshold=size_threshold)
    return folder / "m.onnx"


@pytest.fixture
def user_model(tmp_path):
    """The user's model: a Mixtral graph with its weights in m.onnx.data."""
    return save_external(tmp_path / "in")


def loads_everywhere(path):
    """onnx.load with its data, the full checker, polygraphy's inspector and an ORT session."""
    onnx.load(str(path))
    onnx.checker.check_model(str(path), full_check=False)
    r = subprocess.run([str(Path(sys.executable).parent / "polygraphy"), "inspect", "model", str(path),
                        "--model-type", "onnx"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return moe_export.session(path)


def assert_one_line_error(r, expect=None):
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moe-export: error:") and "Traceback" not in r.stderr, r.stderr
    if expect:
        assert expect in lines[0], lines[0]


@pytest.mark.parametrize("command", ["convert", "calibrate"])
def test_output_onto_the_inputs_data_is_refused(command, user_model, tmp_path):
    tokens = tmp_path / "tokens.npy"
    np.save(tokens, np.random.default_rng(0).integers(0, 128, (4, 16)))
    before = snapshot(user_model.parent)
    extra = ["--data", tokens, "--target-experts", "1.5"] if command == "calibrate" else []
    for target in (user_model.parent / "m.onnx.data", user_model) + ((tokens,) if extra else ()):
        r = run_cli(command, user_model, "-o", target, *extra)
        assert_one_line_error(r, "never modifies its inputs")
    assert snapshot(user_model.parent) == before
    feeds = input_feeds(MIXTRAL)
    ref = ort.InferenceSession(str(MIXTRAL)).run(None, feeds)[0]
    np.testing.assert_array_equal(ort.InferenceSession(str(user_model)).run(None, feeds)[0], ref)


def test_another_directory_gets_a_copy_and_both_models_load(user_model, tmp_path):
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    before = snapshot(user_model.parent)
    r = run_cli("convert", user_model, "-o", out, "--policy", "top-p", "--threshold", "0.5")
    assert r.returncode == 0, r.stderr
    assert "external data copied to m.onnx.data" in r.stdout
    assert snapshot(user_model.parent) == before
    for f in (*user_model.parent.iterdir(), *out.parent.iterdir()):
        assert f.stat().st_nlink == 1 and not f.is_symlink(), f  # onnx refuses linked data files
    loads_everywhere(user_model)
    sess = loads_everywhere(out)
    feeds = input_feeds(MIXTRAL)
    assert sess.run(None, feeds)[0].shape == ort.InferenceSession(str(user_model)).run(None, feeds)[0].shape
    # An output named like a data file gets its own data file, never itself.
    odd = out.parent / "x.onnx.data"
    assert run_cli("convert", user_model, "-o", odd).returncode == 0
    assert (out.parent / "x.onnx.data.data").is_file()
    loads_everywhere(odd)
    # Two outputs from one input in one directory do not share or clash.
    assert run_cli("convert", user_model, "-o", out.parent / "m2.onnx").returncode == 0
    assert (out.parent / "m2.onnx.data").is_file()
    loads_everywhere(out)


def test_same_directory_shares_the_inputs_data(user_model):
    out = user_model.parent / "m.dynamic.onnx"
    before = snapshot(user_model.parent)
    r = run_cli("convert", user_model, "-o", out)
    assert r.returncode == 0 and "shares external data m.onnx.data with the input" in r.stdout, r.stdout
    assert {p.name for p in user_model.parent.iterdir()} == {"m.onnx", "m.onnx.data", "m.dynamic.onnx"}
    assert {k: v for k, v in snapshot(user_model.parent).items() if k != "m.dynamic.onnx"} == before
    loads_everywhere(out)
    loads_everywhere(user_model)


def test_another_models_data_is_not_replaced(user_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert run_cli("convert", user_model, "-o", out / "a.onnx").returncode == 0
    before = snapshot(out)
    assert_one_line_error(run_cli("convert", user_model, "-o", out / "a.onnx.data"), "holds the external data of")
    assert snapshot(out) == before
    loads_everywhere(out / "a.onnx")
    # Replacing an earlier output replaces its own data file, and it still loads.
    assert run_cli("convert", user_model, "-o", out / "a.onnx", "--policy", "ratio", "--threshold", "0.5").returncode == 0
    loads_everywhere(out / "a.onnx")


@pytest.mark.torch
def test_export_never_writes_over_the_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"model_type": "mixtral"}')
    (ckpt / "model.safetensors").write_bytes(b"weights")
    before = snapshot(ckpt)
    for target in ("config.json", "model.safetensors"):
        assert_one_line_error(run_cli("export", ckpt, "-o", ckpt / target), "never modifies its inputs")
    assert snapshot(ckpt) == before


def test_small_initializers_stored_outside_are_read(tmp_path):
    src = save_external(tmp_path / "in", size_threshold=0)  # k, axes and shapes in m.onnx.data too
    out = tmp_path / "m.onnx"
    r = run_cli("convert", src, "-o", out)
    assert r.returncode == 0, r.stderr
    rep = run_cli("validate", src, out)
    assert rep.returncode == 0 and "reproduces the original: yes" in rep.stdout, rep.stdout + rep.stderr
    # ORT cannot load the original as it is (shape inference wants axes inside the graph); the
    # output carries its small constants inside, so it loads everywhere.
    loads_everywhere(out)


def test_a_data_file_of_small_tensors_only_is_still_the_inputs(tmp_path):
    """Loading takes small external tensors into the graph; the file they came from (here in a
    subfolder, where no other check sees it) is still the input's, and no output replaces it."""
    src = tmp_path / "g.onnx"
    (tmp_path / "sub").mkdir()
    m = onnx.load(str(GRAPHS / "gate_grouped_sigmoid_e64k8.onnx"))
    onnx.save_model(m, str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="sub/small.data", size_threshold=0)
    data = tmp_path / "sub" / "small.data"
    before = data.read_bytes()
    assert_one_line_error(run_cli("convert", src, "-o", data), "never modifies its inputs")
    assert data.read_bytes() == before


def test_no_unused_initializers_or_dead_nodes_in_converted_graphs(tmp_path):
    for graph in FAMILY_GRAPHS:
        for args in ([], ["--portable", "--policy", "top-p", "--threshold", "0.5"]):
            out = tmp_path / f"{graph.stem}.onnx"
            assert run_cli("convert", graph, "-o", out, *args).returncode == 0
            m = onnx.load(str(out), load_external_data=False)
            read = reads_of(m.graph.node)  # loop bodies read initializers of the main graph too
            unused = [t.name for t in m.graph.initializer if t.name not in read]
            assert unused == [], (graph.stem, args, unused[:5])
            used = read | {o.name for o in m.graph.output}
            dead = [n.name for n in m.graph.node if not any(o in used for o in n.output)]
            assert dead == [], (graph.stem, args, dead[:5])


def big_model(folder, gib):
    folder.mkdir()
    model, nbytes = make_graph(folder, layers=2, experts=8, gib=gib)  # sparse weights file
    return model, nbytes


def leftovers(d):
    return sorted(str(p.relative_to(d)) for p in Path(d).rglob("*"))


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_copy_leaves_nothing(sig, code, tmp_path):
    """A multi-GB copy, interrupted once its progress bar shows on a terminal: nothing is left."""
    model, _ = big_model(tmp_path / "in", gib=8)
    out = tmp_path / "out"
    out.mkdir()
    master, slave = pty.openpty()
    p = subprocess.Popen([str(EXE), "convert", str(model), "-o", str(out / "m.onnx")],
                         stdout=subprocess.PIPE, stderr=slave, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    os.close(slave)
    seen, t0 = b"", time.monotonic()
    while b"copying" not in seen and time.monotonic() - t0 < 60:
        if select.select([master], [], [], 0.1)[0]:
            seen += os.read(master, 4096)
    assert b"copying" in seen, "no progress bar on a terminal"
    p.send_signal(sig)
    assert p.wait(60) == code
    tail = b""
    while select.select([master], [], [], 0.2)[0]:
        try:
            tail += os.read(master, 4096)
        except OSError:
            break
    os.close(master)
    assert b"interrupted" in tail
    assert leftovers(out) == []
    assert leftovers(tmp_path / "in") == ["model.onnx", "weights.bin"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_during_the_commit_reports_the_output_written(sig, tmp_path):
    """The signal is held while the staged files are renamed into place and arrives right after:
    the output is complete, so the command must not say "nothing was written" (it did, 143)."""
    script = (
        "import os, signal, sys\n"
        "real = os.replace\n"
        "def replace_then_signal(a, b):\n"
        "    real(a, b)\n"
        f"    os.kill(os.getpid(), {int(sig)})  # pending: the commit holds it\n"
        "os.replace = replace_then_signal\n"
        "from moe_export.cli import main\n"
        "main(sys.argv[1:])\n")
    out = tmp_path / "m.onnx"
    r = subprocess.run([sys.executable, "-c", script, "convert", str(MIXTRAL), "-o", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "interrupted after the output was written; it is complete" in r.stderr
    onnx.checker.check_model(onnx.load(str(out)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_a_held_interrupt_marks_only_an_output_that_stays(tmp_path, monkeypatch):
    """The interrupt a commit held is raised as its renames end: marked written for that output,
    and unmarked again when it was staged inside another output that is then rolled back
    (`triton --backend tensorrt` builds its engine so)."""
    from contextlib import contextmanager

    from moe_export.model import files

    @contextmanager
    def delivered_as_the_renames_end(pending):
        yield
        pending.append(signal.SIGINT)

    monkeypatch.setattr(files, "_signals_held", delivered_as_the_renames_end)
    with pytest.raises(KeyboardInterrupt) as got:
        with files.Output() as o:
            o.file(tmp_path / "a.txt", b"a")
    assert got.value.output_committed and (tmp_path / "a.txt").read_bytes() == b"a"
    with pytest.raises(KeyboardInterrupt) as got:
        with files.Output() as outer:
            repo = outer.directory(tmp_path / "repo")
            with files.Output() as inner:
                inner.file(repo / "x", b"x")
    assert not got.value.output_committed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_data_symlinked_out_of_the_folder_is_copied_and_loads(tmp_path):
    """A Hugging Face cache snapshot: model.onnx and its data are symlinks into ../blobs. Data
    shared through such a link escapes the output's folder and onnxruntime refuses it, as it
    refused validate's in-memory original: the output gets a copy, and both load."""
    m = onnx.load(str(MIXTRAL))
    blobs, snap = tmp_path / "blobs", tmp_path / "snap"
    blobs.mkdir(), snap.mkdir()
    onnx.save_model(m, str(blobs / "m.onnx"), save_as_external_data=True, location="weights.data",
                    size_threshold=0)
    os.rename(blobs / "weights.data", blobs / "b0c1")
    os.rename(blobs / "m.onnx", blobs / "a9f2")
    os.symlink("../blobs/a9f2", snap / "model.onnx")
    os.symlink("../blobs/b0c1", snap / "weights.data")
    out = snap / "model.static.onnx"
    r = run_cli("convert", snap / "model.onnx", "-o", out)
    assert r.returncode == 0 and "external data copied" in r.stdout, r.stdout + r.stderr
    moe_export.session(out)
    v = run_cli("validate", snap / "model.onnx", out)
    assert v.returncode == 0 and "reproduces the original: yes" in v.stdout, v.stdout + v.stderr


def test_data_named_outside_the_folder_stays_onnxruntimes_to_refuse(tmp_path):
    """Only links inside the folder are followed for an in-memory session: a location that
    names a place outside ("../") is left as written, and onnxruntime refuses it."""
    m = onnx.load(str(MIXTRAL))
    (tmp_path / "m").mkdir(), (tmp_path / "secret").mkdir()
    onnx.save_model(m, str(tmp_path / "secret" / "x.onnx"), save_as_external_data=True, location="s.bin")
    g = onnx.load(str(tmp_path / "secret" / "x.onnx"), load_external_data=False)
    for t in g.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../secret/s.bin"
    with pytest.raises(Exception, match="escapes|outside|path"):
        moe_export.session(g, data_dir=tmp_path / "m")


def test_no_progress_bar_off_a_terminal(user_model, tmp_path):
    r = run_cli("convert", user_model, "-o", tmp_path / "m.onnx")
    assert r.returncode == 0 and r.stderr == ""


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so writes past the limit fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def test_write_failure_leaves_nothing(tmp_path):
    """Writes fail past 1 MiB (RLIMIT_FSIZE): one line, and no temporary file left."""
    model, _ = big_model(tmp_path / "in", gib=0.01)
    out = tmp_path / "out"
    out.mkdir()
    r = subprocess.run([str(EXE), "convert", str(model), "-o", str(out / "m.onnx")], capture_output=True,
                       text=True, preexec_fn=_limit_file_size)
    assert_one_line_error(r, "too large")
    assert leftovers(out) == []


@pytest.fixture
def small_filesystem(tmp_path):
    d = tmp_path / "small"
    d.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(d)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root); test_write_failure_leaves_nothing covers EFBIG")
    yield d
    subprocess.run(["umount", str(d)], check=True)


def test_full_filesystem_leaves_nothing(small_filesystem, tmp_path):
    model, _ = big_model(tmp_path / "in", gib=0.01)  # 10 MiB of weights onto a 4 MiB file system
    r = run_cli("convert", model, "-o", small_filesystem / "m.onnx")
    assert_one_line_error(r, "No space left on device")
    assert leftovers(small_filesystem) == []
    # triton: no model directory, and no repository directory it made
    conv = tmp_path / "in" / "conv.onnx"
    assert run_cli("convert", model, "-o", conv).returncode == 0
    r = run_cli("triton", conv, "-o", small_filesystem / "repo", "--name", "m")
    assert_one_line_error(r, "No space left on device")
    assert leftovers(small_filesystem) == []


def test_failed_triton_leaves_no_repository(tmp_path):
    conv = tmp_path / "m.onnx"
    assert run_cli("convert", MIXTRAL, "-o", conv).returncode == 0
    r = run_cli("triton", conv, "-o", tmp_path / "repo", "--name", "m", "--backend", "tensorrt")
    assert_one_line_error(r, "TensorRT")
    assert not (tmp_path / "repo").exists()


def test_triton_repository_is_readable_by_the_servers_user(tmp_path):
    conv = tmp_path / "in" / "m.onnx"
    conv.parent.mkdir()
    onnx.save(onnx.load(str(MIXTRAL)), str(tmp_path / "in" / "orig.onnx"), save_as_external_data=True,
              location="orig.onnx.data")
    assert run_cli("convert", tmp_path / "in" / "orig.onnx", "-o", conv).returncode == 0
    old = os.umask(0o022)
    try:
        r = run_cli("triton", conv, "-o", tmp_path / "repo", "--name", "m")
    finally:
        os.umask(old)
    assert r.returncode == 0, r.stderr
    for p in [tmp_path / "repo", *(tmp_path / "repo").rglob("*")]:
        mode = p.stat().st_mode
        assert mode & 0o004, f"{p} is not readable by others ({oct(mode)})"
        if p.is_dir():
            assert mode & 0o001, f"{p} cannot be entered by others ({oct(mode)})"
    assert (tmp_path / "repo" / "m" / "1" / "model.onnx.data").stat().st_nlink == 1
    loads_everywhere(tmp_path / "repo" / "m" / "1" / "model.onnx")


def test_build_engine_never_writes_over_its_input(user_model, tmp_path):
    before = snapshot(user_model.parent)
    for target in (user_model, user_model.parent / "m.onnx.data"):
        assert_one_line_error(run_cli("build-engine", user_model, "-o", target), "never modifies its inputs")
    assert snapshot(user_model.parent) == before
