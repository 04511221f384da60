"""MindSpore Lite step server: runs a bundle's static graphs for a client that cannot import mindspore_lite.

Lite wheels are tied to one Python (2.0.0: Python 3.7) and one CANN release, so the app talks to this process over
its stdin/stdout with a small length-prefixed binary protocol. This file is run as a script and must stay importable
on Python 3.7 with only numpy and mindspore_lite (no package imports, no 3.8+ syntax).

Frame: 4-byte big-endian length, then a 4-byte header length, a UTF-8 JSON header, and the raw bytes of the arrays
the header lists (``{"arrays": [{"dtype", "shape"}, ...]}``), within MAX_HEADER and MAX_FRAME. Requests: ``load``
(graph name -> ONNX path; converted to MindIR on first use into ``cache_dir``), ``reset`` (forget the KV cache), ``run``
(inputs -> logits). Replies are ``{"ok": true}`` (with the logits for ``run``) or ``{"error": message}``; while loading,
the server also sends ``{"op": "progress", "stage": one of STAGES, "graph": name}`` before converting and before
building each graph (building compiles it for the device), which can take hours for a 6B model on a board. Both sides
parse frames with the same strict checks.

Outputs are taken by position, never by name (the Ascend graph compiler may rename them): every static graph's outputs
are the logits, then each layer's present key and value (``appliance.conversion.static_output_names``), and the
presents are kept and fed, in that order, to the next graph's ``past_*`` inputs, which list the same layers in the same
order. Input names stay: the converter config's ``input_shape`` names them.
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
        self.cache = []

    def load(self, request, progress):
        """Convert (first use) and build every graph, calling ``progress(stage, graph)`` before each step."""
        mslite = self.mslite
        context = mslite.Context()
        context.target = ["ascend"] if request.get("device") == "ascend" else ["cpu"]
        if request.get("device") == "ascend":
            context.ascend.device_id = int(request.get("device_id", 0))
        if request.get("threads"):
            context.cpu.thread_num = int(request["threads"])
        os.makedirs(request["cache_dir"], exist_ok=True)
        for name, onnx_path in request["graphs"].items():
            mindir = os.path.join(request["cache_dir"], graph_file_name(name))
            if not os.path.exists(mindir + ".mindir"):
                progress("converting", name)
                # converted under another name and renamed when complete: a server killed while converting (deadline,
                # Ctrl-C) leaves no truncated model that the next start would take for a converted one
                converter = mslite.Converter()
                converter.convert(mslite.FmkType.ONNX, onnx_path, mindir + ".partial")
                os.replace(mindir + ".partial.mindir", mindir + ".mindir")
            progress("building", name)
            model = mslite.Model()
            model.build_from_file(mindir + ".mindir", mslite.ModelType.MINDIR, context)
            self.models[name] = model
        if "decode" in self.models:
            self.decode_inputs = [t.name for t in self.models["decode"].get_inputs()]
        return {"ok": True, "graphs": sorted(self.models)}

    def run(self, request, arrays):
        name = request["graph"]
        model = self.models[name]
        given = dict(zip(request["names"], arrays))
        inputs = model.get_inputs()
        values = graph_inputs(name, [t.name for t in inputs], [list(t.shape) for t in inputs], given, self.cache)
        if any(list(t.shape) != list(v.shape) for t, v in zip(inputs, values)):
            # dynamic (batch) dimensions: give Lite the concrete shapes; the old input tensors go stale after resize
            model.resize(inputs, [list(v.shape) for v in values])
            inputs = model.get_inputs()
        for tensor, value in zip(inputs, values):
            tensor.set_data_from_numpy(np.ascontiguousarray(value))
        outputs = model.predict(inputs)
        check_output_count(name, len(outputs), self.decode_inputs)  # here: Lite 2.0.0 has no Model.get_outputs
        outputs = [np.array(t.get_data_to_numpy(), copy=True) for t in outputs]  # Lite reuses its buffers
        self.cache = outputs[1:]
        return outputs[0]


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
                write_frame(stdout, {"ok": True}, [server.run(request, arrays)])
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
