"""MindSpore Lite step server: runs a bundle's static graphs for a client that cannot import mindspore_lite.

Lite wheels are tied to one Python (2.0.0: Python 3.7) and one CANN release, so the app talks to this process over
its stdin/stdout with a small length-prefixed binary protocol. This file is run as a script and must stay importable
on Python 3.7 with only numpy and mindspore_lite (no package imports, no 3.8+ syntax).

Frame: 4-byte big-endian length, then a 4-byte header length, a UTF-8 JSON header, and the raw bytes of the arrays
the header lists (``{"arrays": [{"dtype", "shape"}, ...]}``), within MAX_HEADER and MAX_FRAME. Requests: ``load``
(graph name -> its ONNX file, converter config and input shapes, and the MindIR ``convert.sh`` made if there is one;
the runtime config; see ``Server.load``), ``reset`` (forget the KV cache), ``run`` (inputs -> logits). Replies are
``{"ok": true}`` (for ``run`` with the logits, and ``"host_bytes"``: the bytes the run copied, see ``Server.run``) or
``{"error": message}``; while loading, the server also sends ``{"op": "progress", "stage": one of STAGES, "graph":
name}`` before converting and before building each graph (building compiles it for the device), which can take hours
for a 6B model on a board. Both sides parse frames with the same strict checks.

Outputs are taken by position, never by name (the Ascend graph compiler may rename them): every static graph's outputs
are the logits, then each layer's present key and value (``appliance.conversion.static_output_names``), and the
presents are kept and fed, in that order, to the next graph's ``past_*`` inputs, which list the same layers in the same
order. Input names stay: the input shapes given to the converter name them.
"""

import json
import os
import re
import struct
import sys

import numpy as np

MAX_HEADER = 1 << 16  # a header lists a few arrays, or the graphs to load with their paths
MAX_FRAME = 1 << 28  # the largest request, a prefill's gear x gear fp32 attention_bias, is 16 MiB at a 2048 gear
MAX_DIMS = 8
DTYPES = ("<f4", "<f2", "<i4", "<i8", "|b1")
GRAPH_NAME = re.compile(r"[A-Za-z0-9_]{1,32}(:[0-9]{1,6})?\Z")
STAGES = ("converting", "building")  # a load's progress: ONNX -> MindIR (first use only), then compiling the MindIR


class ProtocolError(ValueError):
    """A frame that breaks the protocol: nothing after it on the stream can be trusted."""


def graph_file_name(graph):
    """The file name a graph's converted model is cached under; the names come from a bundle's manifest, so only plain
    names ("decode", "prefill:64") are accepted, never a path."""
    if not isinstance(graph, str) or not GRAPH_NAME.match(graph):
        raise ValueError("graph name %.80r is not a plain name (up to 32 letters, digits or '_', optionally ':' and a "
                         "number)" % (graph,))
    return graph.replace(":", "_")


def encode_frame(header, arrays=()):
    arrays = [np.ascontiguousarray(a) for a in arrays]
    header = dict(header)
    header["arrays"] = [{"dtype": a.dtype.str, "shape": list(a.shape)} for a in arrays]
    head = json.dumps(header).encode("utf-8")
    body = b"".join(a.tobytes() for a in arrays)
    return struct.pack(">II", 4 + len(head) + len(body), len(head)) + head + body


def write_frame(stream, header, arrays=()):
    stream.write(encode_frame(header, arrays))
    stream.flush()


def frame_length(prefix):
    """From a frame's 8-byte prefix: (bytes that follow it, header length), both checked against the limits."""
    total, head_len = struct.unpack(">II", prefix)
    if not 2 <= head_len <= MAX_HEADER or not 4 + head_len <= total <= MAX_FRAME:
        raise ProtocolError("a frame of %d bytes with a %d-byte header; allowed: a header of 2 to %d bytes, a frame of "
                            "at most %d bytes" % (total, head_len, MAX_HEADER, MAX_FRAME))
    return total - 4, head_len


def _array_spec(spec):
    shape = spec.get("shape") if isinstance(spec, dict) else None
    if (not isinstance(spec, dict) or spec.get("dtype") not in DTYPES or not isinstance(shape, list)
            or len(shape) > MAX_DIMS or not all(type(d) is int and 0 <= d <= MAX_FRAME for d in shape)):
        raise ProtocolError("an array entry that is not {\"dtype\": one of %s, \"shape\": up to %d sizes}: %.80s"
                            % (", ".join(DTYPES), MAX_DIMS, json.dumps(spec)))
    return np.dtype(spec["dtype"]), shape


def parse_frame(data, head_len):
    """(header, arrays) from the bytes after a frame's prefix; the arrays must fill the rest of the frame exactly."""
    try:
        header = json.loads(bytes(data[:head_len]).decode("utf-8"))
    except (ValueError, RecursionError):  # bad UTF-8 and bad JSON are ValueErrors
        raise ProtocolError("a frame header that is not UTF-8 JSON") from None
    if not isinstance(header, dict) or not isinstance(header.get("arrays"), list):
        raise ProtocolError("a frame header that is not an object with an \"arrays\" list")
    arrays, offset = [], head_len
    for spec in header["arrays"]:
        dtype, shape = _array_spec(spec)
        size = dtype.itemsize
        for dim in shape:
            size *= dim
        if offset + size > len(data):
            raise ProtocolError("a frame shorter than its header says (%d bytes)" % (4 + len(data)))
        # each array gets a copy of its own: a view at the header's offset is misaligned, and MindSpore Lite computes
        # wrong values from misaligned input arrays
        arrays.append(np.frombuffer(data[offset:offset + size], dtype).reshape(shape))
        offset += size
    if offset != len(data):
        raise ProtocolError("a frame with %d bytes after the arrays its header lists" % (len(data) - offset))
    return header, arrays


def _read_exact(stream, size):
    data = b""
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            raise EOFError("the other side closed the pipe")
        data += chunk
    return data


def read_frame(stream):
    rest, head_len = frame_length(_read_exact(stream, 8))
    return parse_frame(_read_exact(stream, rest), head_len)


class Server:
    def __init__(self):
        import mindspore_lite as mslite

        self.mslite = mslite
        self.models = {}
        self.decode_inputs = []  # the decode step's input names: how many presents each graph must return
        self.cache = []  # the KV cache: the decode graph's own past_* input tensors, once a prefill has filled them

    def load(self, request, progress):
        """Build every graph, calling ``progress(stage, graph)`` before each step: from the MindIR ``convert.sh``
        recorded in the bundle, or else converted here on first use with the bundle's own converter settings (its
        config and input shapes) into ``cache_dir``. Every build reads the bundle's runtime config (``config_path``:
        the GE backend on an NPU; Lite's CPU backend ignores it). With Lite >= 2.2 on an NPU the graphs join one
        ModelGroup sharing their weights; Lite 2.0.0 has no ModelGroup in Python, so each graph holds its own."""
        mslite = self.mslite
        on_npu = request.get("device") == "ascend"
        context = lite_context(mslite, on_npu, int(request.get("device_id", 0)), request.get("threads"))
        cache = request["cache_dir"]
        for name in request["graphs"]:
            graph_file_name(name)  # before anything is written
        os.makedirs(cache, exist_ok=True)
        runtime_config = write_text(os.path.join(cache, "runtime.ini"), request["runtime_config"])
        models = {name: mslite.Model() for name in request["graphs"]}
        if on_npu and hasattr(mslite, "ModelGroup"):
            self.group = mslite.ModelGroup(mslite.ModelGroupFlag.SHARE_WEIGHT)  # kept for as long as the models
            self.group.add_model(list(models.values()))
        for name, graph in request["graphs"].items():
            mindir = graph["mindir"] or os.path.join(cache, graph_file_name(name) + ".mindir")
            if not os.path.exists(mindir):
                progress("converting", name)
                convert_graph(mslite, graph, request["optimize"], mindir)
            progress("building", name)
            models[name].build_from_file(mindir, mslite.ModelType.MINDIR, context, runtime_config)
        self.models = models
        if "decode" in self.models:
            self.decode_inputs = [t.name for t in self.models["decode"].get_inputs()]
        return {"ok": True, "graphs": sorted(self.models)}

    def run(self, request, arrays):
        """Run a graph on the request's arrays and the kept cache: (its logits, the bytes this run copied between
        numpy arrays and Lite tensors or between Lite tensors: the reply's ``host_bytes``).

        The cache stays in Lite tensors: the decode graph's own ``past_*`` inputs. What Lite 2.0.0 does (measured on
        its CPU backend) leaves no cheaper correct place for it:
        - ``set_data_from_numpy`` points a tensor at the array (no copy) and ``get_data_to_numpy`` is a view of the
          tensor's memory;
        - the outputs of ``predict`` are views of memory the model's allocator hands out again on that model's next
          ``predict``: fed straight back as the next step's ``past_*`` inputs they are overwritten while being read
          (wrong logits from the second step on); another model's ``predict`` leaves them alone, but a second decode
          model to alternate with holds a second copy of the weights;
        - a model's own input tensors keep their memory until it is resized.
        So a prefill's presents are copied whole into the decode graph's inputs (``keep``), once per prompt, and each
        decode step reads them in place and copies back only the rows it wrote (``write_rows``): a step's presents
        equal its past everywhere else (``past * (1 - write_slot) + new * write_slot``). A step moves its small inputs,
        its logits and one row per layer's key and value, whatever the context length or the capacity.

        On an NPU, Lite 2.0.0's Python tensors are host memory, so its ``predict`` still moves the inputs (cache
        included) to the device and the outputs back, inside Lite. An NPU build of a later Lite whose Python ``Tensor``
        can live on the device (``device="ascend"``) would keep these input tensors there and write the rows with
        device copies."""
        name = request["graph"]
        model = self.models[name]
        given = dict(zip(request["names"], arrays))
        inputs = model.get_inputs()
        names = [t.name for t in inputs]
        values = graph_inputs(name, names, [list(t.shape) for t in inputs], given, self.cache)
        reads_cache = any(n.startswith("past_") for n in names)
        for tensor, value in zip(inputs, values):
            if list(tensor.shape) != list(value.shape):
                if reads_cache:  # a resize would give the cache's tensors new memory
                    raise ValueError("input %s of graph %s has shape %s where the kept cache takes %s" % (
                        tensor.name, name, list(value.shape), list(tensor.shape)))
                # dynamic (batch) dimensions: give Lite the concrete shapes; the old input tensors go stale
                model.resize(inputs, [list(v.shape) for v in values])
                inputs = model.get_inputs()
                break
        moved = 0
        for i, (tensor, value) in enumerate(zip(inputs, values)):
            if isinstance(value, np.ndarray):  # the past_* inputs already hold the cache
                values[i] = np.ascontiguousarray(value)  # the tensor reads this very array during predict
                tensor.set_data_from_numpy(values[i])
                moved += value.nbytes
        outputs = model.predict(inputs)
        check_output_count(name, len(outputs), self.decode_inputs)  # here: Lite 2.0.0 has no Model.get_outputs
        logits = np.array(outputs[0].get_data_to_numpy(), copy=True)  # the next predict reuses this memory
        moved += logits.nbytes
        if reads_cache:
            moved += write_rows(self.cache, outputs[1:], given["write_slot"])
        else:
            moved += self.keep(outputs[1:])
        return logits, moved

    def keep(self, presents):
        """Copy a prefill's presents into the decode graph's ``past_*`` input tensors, resized to their batch first
        (a resize gives them new memory), which hold the cache from then on; the bytes copied."""
        self.cache = []
        if not presents:  # check_output_count: a graph returns presents only when a decode graph takes them
            return 0
        decode = self.models["decode"]
        inputs = decode.get_inputs()
        batch = presents[0].shape[0]
        if any(t.shape[0] != batch for t in inputs):  # every static graph input is batch-first
            decode.resize(inputs, [[batch] + list(t.shape[1:]) for t in inputs])
            inputs = decode.get_inputs()
        past = [t for t in inputs if t.name.startswith("past_")]
        graph_inputs("decode", [t.name for t in past], [list(t.shape) for t in past], {}, presents)
        moved = 0
        for tensor, present in zip(past, presents):
            view = tensor.get_data_to_numpy()
            np.copyto(view, present.get_data_to_numpy())
            moved += view.nbytes
        self.cache = past
        return moved


def lite_context(mslite, on_npu, device_id, threads):
    """The Context every graph is built with: NPU ``device_id``, or the CPU with ``threads`` (None: Lite's default).
    An Ascend bundle's smoke test (``appliance.ascend_smoke``) builds with this very code."""
    context = mslite.Context()
    context.target = ["ascend"] if on_npu else ["cpu"]
    if on_npu:
        context.ascend.device_id = device_id
    if threads:
        context.cpu.thread_num = int(threads)
    return context


def convert_graph(mslite, graph, optimize, mindir):
    """ONNX -> MindIR as ``convert.sh`` converts (its config file, its input shapes), written under another name
    and renamed when complete: a server killed while converting (deadline, Ctrl-C) leaves no truncated model
    that the next start would take for a converted one. The smoke test converts with this very code."""
    stem = mindir[:-len(".mindir")]
    config = write_text(stem + ".ini", graph["config"])
    convert_onnx(mslite, graph["onnx"], config, graph["shape"], optimize, stem + ".partial")
    converted = stem + ".partial.mindir"
    if not os.path.exists(converted):
        # a model over 2 GB (protobuf's limit) comes as <output>_graph.mindir, which reads its weights from
        # <output>_variables/ by that folder's name (measured with Lite 2.0.0): the graph file may be renamed
        converted = stem + ".partial_graph.mindir"
    os.replace(converted, mindir)


def convert_onnx(mslite, onnx_file, config_file, shape, optimize, output):
    """converter_lite's conversion through Lite's Python API: ``--fmk=ONNX --modelFile --configFile --inputShape
    --optimize --outputFile`` (the MindIR is ``output`` + ".mindir")."""
    converter = mslite.Converter()
    converter.optimize = optimize
    converter.input_shape = parse_input_shape(shape)
    converter.convert(mslite.FmkType.ONNX, onnx_file, output, config_file=config_file)


def write_text(path, text):
    """Write ``text`` to ``path`` whole (through a temporary name) and return the path."""
    with open(path + ".partial", "w") as fh:
        fh.write(text)
    os.replace(path + ".partial", path)
    return path


def parse_input_shape(text):
    """converter_lite's --inputShape text ("name:1,2,3;name2:4") as the Python converter's dict of name -> dims."""
    shapes = {}
    for item in text.strip().split(";"):
        name, _, dims = item.partition(":")
        shapes[name] = [int(d) for d in dims.split(",")]
    return shapes


def check_output_count(graph, count, decode_inputs):
    """A graph returns the logits and one present per ``past_*`` input of the decode step (``decode_inputs``, its
    input names), or its outputs cannot be taken by position."""
    presents = sum(n.startswith("past_") for n in decode_inputs)
    if count != 1 + presents:
        raise ValueError("graph %s has %d outputs where 1 + %d were expected (logits, then each layer's present key "
                         "and value, as the decode step's past_* inputs): re-export the bundle" % (graph, count, presents))


def graph_inputs(graph, names, shapes, given, cache):
    """A graph's input values in its input order: the request's arrays by name, and for the ``past_*`` inputs the
    kept presents by position; each present must have its input's shape (batch aside)."""
    past = [i for i, n in enumerate(names) if n.startswith("past_")]
    if past and len(past) != len(cache):
        raise ValueError("graph %s takes %d past_* inputs and %d presents are kept (run a prefill graph first, or "
                         "re-export the bundle)" % (graph, len(past), len(cache)))
    values = [None if n.startswith("past_") else given[n] for n in names]
    for slot, (i, present) in enumerate(zip(past, cache)):
        if list(present.shape[1:]) != list(shapes[i][1:]):
            raise ValueError("output %d of the previous graph has shape %s where input %s of graph %s takes %s" % (
                slot + 1, list(present.shape), names[i], graph, list(shapes[i])))
        values[i] = present
    return values


def write_rows(cache, presents, write_slot):
    """Copy the cache rows a decode step wrote, those where its ``write_slot`` (``[batch, 1, capacity, 1]``) is not
    0, from its presents into the kept cache tensors (``[batch, heads, capacity, head_dim]``); the bytes copied."""
    rows = [np.flatnonzero(w) for w in write_slot.reshape(len(write_slot), -1)]
    moved = 0
    for tensor, present in zip(cache, presents):
        kept, new = tensor.get_data_to_numpy(), present.get_data_to_numpy()
        for b, slots in enumerate(rows):
            kept[b, :, slots] = new[b, :, slots]
            moved += len(slots) * new[b, :, 0].nbytes
    return moved


def serve(stdin, stdout):
    server = None
    while True:
        try:
            request, arrays = read_frame(stdin)
        except EOFError:
            return
        except ProtocolError as exc:  # the stream is out of step: say why and stop
            write_frame(stdout, {"error": "bad request: %s" % exc})
            return
        try:
            op = request["op"]
            if op == "load":
                server = server or Server()
                write_frame(stdout, server.load(request, lambda stage, graph: write_frame(
                    stdout, {"op": "progress", "stage": stage, "graph": graph})))
            elif op == "reset":
                server.cache = []
                write_frame(stdout, {"ok": True})
            elif op == "run":
                logits, moved = server.run(request, arrays)
                write_frame(stdout, {"ok": True, "host_bytes": moved}, [logits])
            else:
                write_frame(stdout, {"error": "unknown op %r" % op})
        except Exception as exc:  # reported to the client, which shows it to the user
            write_frame(stdout, {"error": "%s: %s" % (type(exc).__name__, exc)})


if __name__ == "__main__":
    # Run as a script, this folder is sys.path[0], where the client module mindspore_lite.py would shadow the wheel.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    # Lite's converter and logger print to stdout: keep the real stdout for frames, send fd 1 to stderr.
    protocol_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    serve(sys.stdin.buffer, protocol_out)
