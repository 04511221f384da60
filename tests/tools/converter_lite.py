"""converter_lite's command line for ``convert.sh`` where only the mindspore_lite wheel exists (Lite 2.0.0 ships the
converter as a Python API, not this tool): the flags convert.sh passes, converted by the step server's own
``convert_onnx``. Without CANN, Lite cannot run the Ascend-oriented passes, so ``--optimize=ascend_oriented`` converts
with ``general`` here; what the tests check through it is convert.sh's own path (its files, arguments, the recorded
manifest) and that the engine then builds that MindIR instead of converting again.
Runs under the Lite Python (Python 3.7)."""

import importlib.util
import os
import sys

import mindspore_lite

SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "appliance", "engines", "lite_server.py")


def main(argv):
    flags = dict(arg[2:].split("=", 1) for arg in argv)
    if flags.pop("fmk") != "ONNX":
        sys.exit("converter_lite (test tool): only --fmk=ONNX")
    spec = importlib.util.spec_from_file_location("lite_server", SERVER)
    server = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(server)
    optimize = "general" if flags["optimize"] == "ascend_oriented" else flags["optimize"]
    server.convert_onnx(mindspore_lite, flags["modelFile"], flags["configFile"], flags["inputShape"], optimize,
                        flags["outputFile"])


if __name__ == "__main__":
    main(sys.argv[1:])
