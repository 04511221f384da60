"""MindSpore Lite step server: runs a bundle's static graphs for a client that cannot import mindspore_lite.

Lite wheels are tied to one Python (2.0.0: Python 3.7) and one CANN release, so the app talks to this process over
its stdin/stdout with a small length-prefixed binary protocol. This file is run as a script and must stay importable
on Python 3.7 with only numpy and mindspore_lite (no package imports, no 3.8+ syntax).

Frame: 4-byte big-endian length, then a 4-byte header length, a UTF-8 JSON header, and the raw bytes of the arrays
the header lists (``{"arrays": [{"name", "dtype", "shape"}, ...]}``). Requests: ``load`` (graph name -> ONNX path;
converted to MindIR on first use into ``cache_dir``), ``reset`` (forget the KV cache), ``run`` (inputs -> logits;
``present_*`` outputs are kept and fed as the next ``past_*`` inputs). Errors come back as ``{"error": message}``.
"""

import json
import os
import struct
import sys

import numpy as np


def write_frame(stream, header, arrays=()):
    arrays = [np.ascontiguousarray(a) for a in arrays]
    header = dict(header)
    header["arrays"] = [{"dtype": a.dtype.str, "shape": list(a.shape)} for a in arrays]
    head = json.dumps(header).encode("utf-8")
    body = b"".join(a.tobytes() for a in arrays)
    stream.write(struct.pack(">II", 4 + len(head) + len(body), len(head)) + head + body)
    stream.flush()


def _read_exact(stream, size):
    data = b""
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            raise EOFError("the other side closed the pipe")
        data += chunk
    return data


def read_frame(stream):
    total, head_len = struct.unpack(">II", _read_exact(stream, 8))
    header = json.loads(_read_exact(stream, head_len).decode("utf-8"))
    body = _read_exact(stream, total - 4 - head_len)
    arrays, offset = [], 0
    for spec in header.get("arrays", []):
        dtype = np.dtype(spec["dtype"])
        size = int(np.prod(spec["shape"])) * dtype.itemsize
        arrays.append(np.frombuffer(body[offset:offset + size], dtype=dtype).reshape(spec["shape"]))
        offset += size
    return header, arrays


class Server:
    def __init__(self):
        import mindspore_lite as mslite

        self.mslite = mslite
        self.models = {}
        self.cache = {}

    def load(self, request):
        mslite = self.mslite
        context = mslite.Context()
        context.target = ["ascend"] if request.get("device") == "ascend" else ["cpu"]
        if request.get("device") == "ascend":
            context.ascend.device_id = int(request.get("device_id", 0))
        if request.get("threads"):
            context.cpu.thread_num = int(request["threads"])
        os.makedirs(request["cache_dir"], exist_ok=True)
        for name, onnx_path in request["graphs"].items():
            mindir = os.path.join(request["cache_dir"], name.replace(":", "_"))
            if not os.path.exists(mindir + ".mindir"):
                converter = mslite.Converter()
                converter.convert(mslite.FmkType.ONNX, onnx_path, mindir)
            model = mslite.Model()
            model.build_from_file(mindir + ".mindir", mslite.ModelType.MINDIR, context)
            self.models[name] = model
        return {"ok": True, "graphs": sorted(self.models)}

    def run(self, request, arrays):
        model = self.models[request["graph"]]
        given = dict(zip(request["names"], arrays))
        inputs = model.get_inputs()
        values = [self.cache["present_" + t.name[5:]] if t.name.startswith("past_") else given[t.name] for t in inputs]
        if any(list(t.shape) != list(v.shape) for t, v in zip(inputs, values)):
            # dynamic (batch) dimensions: give Lite the concrete shapes; the old input tensors go stale after resize
            model.resize(inputs, [list(v.shape) for v in values])
            inputs = model.get_inputs()
        for tensor, value in zip(inputs, values):
            tensor.set_data_from_numpy(np.ascontiguousarray(value))
        outputs = model.predict(inputs)
        values = {t.name: np.array(t.get_data_to_numpy(), copy=True) for t in outputs}  # Lite reuses its buffers
        self.cache = {n: v for n, v in values.items() if n.startswith("present_")}
        return values["logits"]


def serve(stdin, stdout):
    server = None
    while True:
        try:
            request, arrays = read_frame(stdin)
        except EOFError:
            return
        try:
            op = request["op"]
            if op == "load":
                server = server or Server()
                write_frame(stdout, server.load(request))
            elif op == "reset":
                server.cache = {}
                write_frame(stdout, {"ok": True})
            elif op == "run":
                write_frame(stdout, {"ok": True}, [server.run(request, arrays)])
            elif op == "pid":
                write_frame(stdout, {"ok": True, "pid": os.getpid()})
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
