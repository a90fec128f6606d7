"""ONNX Runtime GenAI model folders: a decoder graph beside genai_config.json, tokenizer files
and, once converted, the DynamicRouter library. onnxruntime-genai loads a custom-op library
only from inside the model folder (a path with no `..`), named in
model.decoder.session_options.custom_ops_library."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import MoeExportError
from ..native import custom_op_library
from .files import Output, check_output_parent, model_files, same_file
from .graph import load_model
from ..op.schema import DOMAIN

CONFIG = "genai_config.json"


def is_folder(path) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG).is_file()


def read_config(folder: Path) -> dict:
    try:
        cfg = json.loads((folder / CONFIG).read_text())
        cfg["model"]["decoder"]
        return cfg
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MoeExportError(f"{folder / CONFIG}: not an ONNX Runtime GenAI config ({type(e).__name__}: {e})") from None


def decoder_file(folder) -> Path:
    folder = Path(folder)
    name = read_config(folder)["model"]["decoder"].get("filename", "model.onnx")
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise MoeExportError(f"{folder / CONFIG}: decoder filename {name!r} is not inside the folder")
    return folder / name


def resolve(path) -> Path:
    """The graph a model argument names: the decoder of a GenAI folder, else the path itself."""
    path = Path(path)
    if is_folder(path):
        return decoder_file(path)
    if path.is_dir():
        raise MoeExportError(f"{path} is a directory without {CONFIG}; give an .onnx file or a GenAI model folder")
    return path


def check_folder_output(src, dst) -> None:
    """Refuses an output folder path before any work: it must be new, in an existing folder (as
    an output file must), outside the input folder, and not named like a graph."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise MoeExportError(f"{dst} exists; remove it or choose another name")
    check_output_parent(dst)
    if dst.suffix == ".onnx":
        raise MoeExportError(f"output {dst}: a GenAI model folder is written to a new folder; give a folder name")
    if dst.resolve().is_relative_to(src.resolve()):
        raise MoeExportError(f"output {dst} is inside the input folder {src}; moe-export never modifies its inputs")


def own_library(src, model, needs_library) -> str | None:
    """The custom ops library the folder's decoder loads for ops of its own (a converted decoder
    names moe-export's), or None; refused where the conversion needs moe-export's, since genai
    loads one library per session."""
    lib = (read_config(src)["model"]["decoder"].get("session_options") or {}).get("custom_ops_library")
    if lib is None or any(o.domain == DOMAIN for o in model.opset_import):
        return None
    if needs_library:
        raise MoeExportError(f"{src}'s decoder loads its own custom ops library {lib}, and onnxruntime-genai "
                             "takes one per session: convert with --portable (the router in standard ONNX ops, "
                             "no library)")
    return lib


def write_folder(src, dst, transform, protect=(), load=None, needs_library=True):
    """Writes the GenAI folder `src` to the new folder `dst` with its decoder graph passed through
    `transform` (ModelProto -> ModelProto, in memory); every other file is copied, the
    DynamicRouter library put inside unless the graph needs none (--portable). Returns what
    transform returned with the model, and notes for the user. `load`: returns the decoder graph
    (a copy of one the caller has loaded). needs_library: whether the output will (not --portable)."""
    src, dst = Path(src), Path(dst)
    dec = decoder_file(src)
    check_folder_output(src, dst)
    model = load_model(dec) if load is None else load()
    own = own_library(src, model, needs_library)
    ours = model_files(dec)
    with Output(protected=ours + [Path(p) for p in protect]) as out:
        stage = out.directory(dst)
        model, result = transform(model)
        rel = dec.relative_to(src)
        out.model(model, out.mkdir((stage / rel).parent) / rel.name, dec.parent)
        cfg = read_config(src)
        options = cfg["model"]["decoder"].setdefault("session_options", {})
        old_lib = options.pop("custom_ops_library", None)
        lib = Path(custom_op_library()) if any(o.domain == DOMAIN for o in model.opset_import) else None
        if own is not None:  # the model's own ops: kept, the library copied with the other files
            options["custom_ops_library"], old_lib = own, None
        if lib is not None:
            out.copy(lib, stage / lib.name)
            options["custom_ops_library"] = lib.name
        skip = {CONFIG, old_lib, lib and lib.name}
        for f in sorted(src.rglob("*")):  # tokenizer, processor configs, other graphs of the model
            r = f.relative_to(src)
            if f.is_file() and str(r) not in skip and not any(same_file(f, o) for o in ours):
                out.copy(f, out.mkdir((stage / r).parent) / r.name)
        out.file(stage / CONFIG, (json.dumps(cfg, indent=4) + "\n").encode())
    notes = [n for n in out.notes if not n.startswith("external data copied")]
    return result, notes + [f"GenAI model folder: og.Model({str(dst)!r}) loads it"]


def generate(folder, prompt, max_length=48, threads=None):
    """Greedy token ids onnxruntime-genai generates from the folder for `prompt` (token ids [1, n]).
    threads: intra-op threads of the decoder session (genai's default otherwise)."""
    import numpy as np
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    if threads is not None:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.asarray(prompt, dtype=np.int32).reshape(1, -1))
    while not gen.is_done():
        gen.generate_next_token()
    return np.asarray(gen.get_sequence(0)).tolist()
