"""``smoke_test.py``, the script every Ascend bundle carries: a field engineer runs it on the board before the hours of
``convert.sh``, and learns within minutes whether MindSpore Lite and the NPU convert, build and compute this model
right.

It converts the bundle's one-layer graph (``smoke.onnx``, written by ``model_export.ascend_smoke``) into a temporary
folder, builds it, runs it once on a fixed prompt (``smoke/inputs.npz``) and compares the logits with the numpy
reference's (``smoke/expected_logits.npy``), under ``SMOKE_LIMITS`` for what runs: on the NPU the
bundle's weight precision (int8: the converter's 8-bit weights), on the CPU (``--device cpu``: the fp32 check graph,
no weight quantization, as the engine runs it there) the precision the export verified.

The text is rendered from StreamChat's own code and constants, never from a manifest: the step server's functions
(their source, so the test converts and builds exactly as the engine does), the thresholds, the file names and the
CPU converter config of ``appliance.conversion``. ``Bundle.open`` requires a bundle's copy to be exactly this text,
like ``convert.sh``; the script reads bundle files by fixed names only, and its data with ``allow_pickle=False``.
It runs on any Python 3.7+ with numpy and mindspore_lite (Lite 2.0.0 wheels are for Python 3.7).
"""

from __future__ import annotations

import functools
import inspect
import pprint

# the step server's functions the script calls (appliance.engines.lite_server); their source, and that of the functions
# they call, is part of it
LITE_HELPERS = ("lite_context", "convert_graph", "parse_input_shape")
# per precision of what runs: fp32 rounding; fp16 compute (logits rounded to fp16 before their cast); 8-bit weights
SMOKE_LIMITS = {"fp32": {"relative_diff": 1e-4, "cosine": 0.99999},
                "fp16": {"relative_diff": 2e-2, "cosine": 0.999},
                "int8": {"relative_diff": 1e-1, "cosine": 0.99}}

SCRIPT_HEAD = r'''#!/usr/bin/env python3
"""StreamChat smoke test of this Ascend bundle: does this machine's MindSpore Lite (and NPU) convert, build and
compute this model right? Minutes, where ./convert.sh takes hours for a 6B model: run it first.

    python3 smoke_test.py [--device ascend|cpu] [--device-id N]

It converts the model's first layer (smoke.onnx: embedding, layer 0, final LayerNorm and lm_head at the smallest
prefill gear) as StreamChat's engine does, builds it, runs it once on a fixed prompt and compares the logits with
the ones StreamChat's numpy reference computed when it exported the bundle. --device cpu (no NPU needed) runs the
fp32 check graph on Lite's CPU backend. The converted model goes to a temporary folder (TMPDIR), removed at the end.
Use a Python with numpy and mindspore_lite (Lite 2.0.0: Python 3.7), after sourcing the CANN toolkit's set_env.sh.
Exit status: 0 PASS, 1 FAIL (the stack failed or computed wrong), 2 setup error (this Python, this folder).
Written by StreamChat: the app refuses a bundle whose copy of this file differs.
"""
import os
import sys

# run as a script, the bundle folder is sys.path[0]: no module may be imported from it, the standard library's
# included (os and sys are loaded before any script runs)
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))  # the bundle (``--bundle`` when StreamChat runs its own copy)

'''

SCRIPT_BODY = r'''

LITE_HINT = ("use the Python that has the mindspore_lite wheel (the one STREAMCHAT_LITE_PYTHON names for StreamChat; "
             "Lite 2.0.0 needs Python 3.7), after `source set_env.sh` of the CANN toolkit on an NPU machine")
NPU_CHIP = re.compile(r"\|\s*([0-9]+)\s+((?:910|310)[0-9A-Za-z]*)\s*\|\s*([A-Za-z]+)")


class SetupError(Exception):
    """The test cannot run here: exit 2."""


class Failed(Exception):
    """The stack failed, or computed wrong: exit 1."""


def one_line(text, limit=300):
    """``text`` as one printable line of at most ``limit`` characters."""
    text = " ".join(str(text).split())
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def npu_summary():
    try:
        proc = subprocess.run(["npu-smi", "info"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    except FileNotFoundError:
        return "npu-smi: not found"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return "npu-smi: cannot run it (%s)" % one_line(exc)
    text = proc.stdout.decode("utf-8", "replace")
    if proc.returncode != 0:
        return "npu-smi: exit status %d: %s" % (proc.returncode, one_line(text, 200))
    version = re.search(r"Version:\s*(\S+)", text)
    chips = ["%s %s (%s)" % found for found in NPU_CHIP.findall(text)]
    return one_line("npu-smi: version %s; NPUs: %s" % (version.group(1) if version else "?",
                                                      ", ".join(chips) if chips else "none listed"))


def bundle_path(rel):
    path = os.path.join(HERE, rel)
    if not os.path.isfile(path):
        raise SetupError("%s is missing: run the smoke_test.py of a whole bundle (re-copy it)" % rel)
    return path


def read_text(rel):
    try:
        with open(bundle_path(rel), encoding="utf-8") as fh:
            return fh.read()
    except (OSError, ValueError) as exc:  # unreadable, or not UTF-8 text
        raise SetupError("%s cannot be read (%s): re-copy the bundle" % (rel, one_line(exc, 150)))


def precisions():
    """(weight precision, compute precision) from manifest.json, each one of the values an Ascend export writes."""
    try:
        manifest = json.loads(read_text("manifest.json"))
        weights, compute = manifest["quant"]["weights"], manifest["graphs"]["compute"]
    except (ValueError, KeyError, TypeError) as exc:
        raise SetupError("manifest.json is not an Ascend bundle's manifest (%s): re-copy the bundle"
                         % one_line(exc, 100))
    if weights not in ("int8", "fp16", "fp32") or compute != ("fp32" if weights == "fp32" else "fp16"):
        raise SetupError("manifest.json names weights %s and compute %s: not an Ascend bundle StreamChat exports"
                         % (one_line(weights, 20), one_line(compute, 20)))
    return weights, compute


def load_data(np, shape_text):
    """The run's inputs and the reference logits; they must match the graph's input shapes (converter/*.shape)."""
    try:
        shapes = parse_input_shape(shape_text)
        with np.load(bundle_path(INPUTS), allow_pickle=False) as data:
            inputs = {name: np.ascontiguousarray(data[name]) for name in data.files}
        expected = np.load(bundle_path(EXPECTED), allow_pickle=False)
    except SetupError:
        raise
    except Exception as exc:  # whatever numpy raises for a damaged file (ValueError, OSError, zipfile's errors)
        raise SetupError("the smoke test's files cannot be read (%s): re-copy the bundle" % one_line(exc, 150))
    if sorted(inputs) != sorted(shapes) or any(list(inputs[n].shape) != shapes[n] for n in shapes) \
            or not {"input_ids", "last_position"} <= set(inputs) or expected.dtype != np.float32 or expected.ndim != 2:
        raise SetupError("%s, %s and %s do not belong together: re-copy the bundle" % (INPUTS, EXPECTED, SHAPE))
    return inputs, expected


def convert(mslite, onnx_file, config, shape, optimize, work):
    started = time.time()
    mindir = os.path.join(work, "smoke.mindir")
    try:
        convert_graph(mslite, {"onnx": bundle_path(onnx_file), "config": config, "shape": shape}, optimize, mindir)
    except Exception as exc:  # Lite raises RuntimeError, and its messages are the diagnosis
        raise Failed("conversion of %s: %s: %s" % (onnx_file, type(exc).__name__, one_line(exc)))
    # a model over 2 GB keeps its weights in a folder beside the graph file: count every file the conversion made
    size = sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(work) for name in names)
    return mindir, time.time() - started, size


def build(mslite, mindir, on_npu, device_id):
    started = time.time()
    model = mslite.Model()
    try:
        context = lite_context(mslite, on_npu, device_id, None)
        model.build_from_file(mindir, mslite.ModelType.MINDIR, context, bundle_path(RUNTIME_CONFIG))
    except Exception as exc:
        raise Failed("build: %s: %s" % (type(exc).__name__, one_line(exc)))
    return model, time.time() - started


def run(np, model, inputs):
    """The logits (the first output: outputs are taken by position, as the engine takes them)."""
    started = time.time()
    try:
        tensors = model.get_inputs()
        for tensor in tensors:
            if tensor.name not in inputs:
                raise Failed("the built model takes an input %s that %s does not hold" % (one_line(tensor.name, 60),
                                                                                       INPUTS))
            tensor.set_data_from_numpy(inputs[tensor.name])
        outputs = model.predict(tensors)
        logits = np.array(outputs[0].get_data_to_numpy(), dtype=np.float32)
    except Failed:
        raise
    except Exception as exc:
        raise Failed("run: %s: %s" % (type(exc).__name__, one_line(exc)))
    return logits, time.time() - started


def compare(np, got, want, precision):
    """One line of measures and the list of limits they miss (``LIMITS`` per precision: the largest |difference| as a
    share of the largest |logit|, so the limit holds at any logit scale; the cosine; the same top token)."""
    limits = LIMITS[precision]
    stated = "|diff| <= %g x largest |logit|, cosine >= %g, same top-1 token" % (limits["relative_diff"],
                                                                                  limits["cosine"])
    if got.shape != want.shape:
        return "compare: logits %s where %s holds %s" % (list(got.shape), EXPECTED, list(want.shape)), ["logits shape"]
    a, b = got.astype(np.float64).ravel(), want.astype(np.float64).ravel()
    diff, scale = float(np.max(np.abs(a - b))), float(np.max(np.abs(b)))
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    top, want_top = int(np.argmax(a)), int(np.argmax(b))
    missed = []
    if not diff <= limits["relative_diff"] * scale:
        missed.append("max |diff| %.3g > %g x %.3g" % (diff, limits["relative_diff"], scale))
    if not cosine >= limits["cosine"]:
        missed.append("cosine %.6f < %g" % (cosine, limits["cosine"]))
    if top != want_top:
        missed.append("top-1 token %d where the reference has %d" % (top, want_top))
    line = ("compare: max |diff| %.3g (largest |logit| %.3g), cosine %.6f, top-1 %d (reference %d: %s); %s limits: %s"
            % (diff, scale, cosine, top, want_top, "agrees" if top == want_top else "differs", precision, stated))
    return line, missed


def parse_args(argv):
    parser = argparse.ArgumentParser(description="StreamChat smoke test of this Ascend bundle (see the top of this "
                                                 "file).")
    parser.add_argument("--device", choices=("ascend", "cpu"), default="ascend",
                        help="ascend: the device graph on the NPU (default); cpu: the fp32 check graph on Lite's CPU")
    parser.add_argument("--device-id", type=int, default=0, help="the NPU to use (npu-smi lists them; default 0)")
    parser.add_argument("--bundle", default=HERE, help="the bundle folder (default: this file's)")
    args = parser.parse_args(argv)
    if args.device_id < 0:
        parser.error("--device-id must be 0 or more")
    return args


def main(args, say):
    on_npu = args.device == "ascend"
    npu = npu_summary()
    say(npu)
    try:
        import numpy as np
    except ImportError as exc:
        say("numpy: cannot import it (%s): %s" % (one_line(exc, 200), LITE_HINT))
        raise SetupError("no numpy in %s" % sys.executable)
    try:
        import mindspore_lite as mslite
    except Exception as exc:  # ImportError, or OSError: a library of CANN not found
        say("mindspore_lite: cannot import it (%s: %s): %s" % (type(exc).__name__, one_line(exc, 200), LITE_HINT))
        raise SetupError("no mindspore_lite in %s" % sys.executable)
    say("mindspore_lite: %s from %s (Python %s, numpy %s)" % (getattr(mslite, "__version__", "?"),
                                                              os.path.dirname(mslite.__file__),
                                                              sys.version.split()[0], np.__version__))
    weights, compute = precisions()
    shape = read_text(SHAPE).strip()
    inputs, expected = load_data(np, shape)
    if on_npu:  # the device graph with the converter config of its precision: what convert.sh converts
        graph, config, optimize, precision = DEVICE_GRAPH, DEVICE_CONFIGS[weights], "ascend_oriented", weights
        settings = "the %s converter config, %s" % (weights, SHAPE)
    else:  # Lite's CPU backend builds neither fp16 compute nor 8-bit weights: the fp32 check graph, unquantized
        graph, config, optimize, precision = CHECK_GRAPHS[compute], CPU_CONFIG, "general", compute
        settings = "CPU config without weight quantization, %s" % SHAPE
    work = tempfile.mkdtemp(prefix="streamchat-smoke-")
    try:
        mindir, seconds, size = convert(mslite, graph, config, shape, optimize, work)
        say("convert: %s (%s, optimize %s) -> MindIR of %.1f MB in %.1f s"
            % (graph, settings, optimize, size / 1e6, seconds))
        model, seconds = build(mslite, mindir, on_npu, args.device_id)
        device = "ascend:%d" % args.device_id if on_npu else "cpu"
        say("build: %s with %s in %.1f s" % (device, RUNTIME_CONFIG, seconds))
        logits, seconds = run(np, model, inputs)
        tokens = int(np.argmax(inputs["last_position"][0, :, 0])) + 1
        say("run: a prompt of %d tokens padded to %d in %.3f s -> logits %s"
            % (tokens, inputs["input_ids"].shape[1], seconds, list(logits.shape)))
    except Failed as exc:  # a stage of the stack failed: where its own messages are
        hint = "MindSpore Lite's messages are on stderr"
        if on_npu:
            hint += "; CANN's are in ~/ascend/log/, or on stderr with ASCEND_SLOG_PRINT_TO_STDOUT=1"
        if on_npu and npu == "npu-smi: not found":
            hint += "; npu-smi was not found: is the NPU driver installed? --device cpu checks MindSpore Lite alone"
        raise Failed("%s -- %s" % (exc, hint))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    line, missed = compare(np, logits, expected, precision)
    say(line)
    if missed:
        raise Failed("; ".join(missed))


if __name__ == "__main__":
    arguments = parse_args(sys.argv[1:])
    HERE = os.path.abspath(arguments.bundle)
    sys.stdout.flush()
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # Lite's converter and logger print to stdout: this script's lines keep it, theirs go to stderr

    def say(line):
        out.write(line + "\n")
        out.flush()

    try:
        main(arguments, say)
        say("PASS")
        status = 0
    except SetupError as exc:
        say("SETUP ERROR: %s" % exc)
        status = 2
    except Failed as exc:
        say("FAIL: %s" % exc)
        status = 1
    except KeyboardInterrupt:
        say("interrupted")
        status = 130
    # at once: Lite 2.0.0 can crash while the interpreter tears its modules down (SIGSEGV after a build on the CPU)
    os._exit(status)
'''


@functools.cache
def smoke_script() -> str:
    """The text of ``smoke_test.py``; ``appliance.conversion`` lists it among an Ascend bundle's files."""
    from appliance import conversion  # which imports this module: it lists the script among a bundle's files
    from appliance.engines import lite_server  # an engine module: imported when a bundle is checked, not with the core

    constants = {
        "LIMITS": SMOKE_LIMITS,
        "DEVICE_GRAPH": conversion.SMOKE_GRAPH + ".onnx",
        "CHECK_GRAPHS": {"fp32": conversion.SMOKE_GRAPH + ".onnx", "fp16": conversion.SMOKE_GRAPH + ".fp32.onnx"},
        "DEVICE_CONFIGS": {quant: conversion.converter_config(quant) for quant in ("fp32", "fp16", "int8")},
        "SHAPE": f"{conversion.CONVERTER_FOLDER}{conversion.SMOKE_GRAPH}.shape",
        "RUNTIME_CONFIG": conversion.RUNTIME_CONFIG,
        "CPU_CONFIG": conversion.LITE_CONFIG,
        "INPUTS": conversion.SMOKE_INPUTS,
        "EXPECTED": conversion.SMOKE_EXPECTED,
    }
    values = "".join(f"{name} = {pprint.pformat(value, width=100, sort_dicts=False)}\n"
                     for name, value in constants.items())
    functions = _with_callees([getattr(lite_server, name) for name in LITE_HELPERS])
    helpers = "\n\n".join(inspect.getsource(function) for function in functions)
    return f"{SCRIPT_HEAD}{values}\n\n{helpers}{SCRIPT_BODY}"


def _with_callees(functions: list) -> list:
    """``functions`` and every function of their module they call, directly or not, in source order."""
    module, found, todo = inspect.getmodule(functions[0]), {}, list(functions)
    while todo:
        function = todo.pop()
        if function.__name__ in found:
            continue
        found[function.__name__] = function
        codes = [function.__code__]
        while codes:  # the function's own names and those of its nested functions and comprehensions
            code = codes.pop()
            codes += [const for const in code.co_consts if inspect.iscode(const)]
            named = (vars(module).get(name) for name in code.co_names)
            todo += [f for f in named if inspect.isfunction(f) and f.__module__ == module.__name__]
    return sorted(found.values(), key=lambda function: function.__code__.co_firstlineno)
