"""A KV cache that cannot fit is refused with the sizes before it is allocated: through the CLI under a real address-space
limit (``ulimit -v``, set with setrlimit in a subprocess), and for the static (Ascend) engine."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.engines.memory import kv_cache_bytes
from appliance.engines.static import OrtGraphRunner, StaticEngine
from appliance.errors import ResourceError
from appliance.model_config import ModelConfig
from model_export.export import export_bundle
from model_export.synthetic import real_config
from streamchat.models import load_model
from tests.conftest import TINY

REPO = Path(__file__).resolve().parent.parent
LONG_CONTEXT = 1 << 15  # the largest context a manifest may ask for; the tiny model keeps 1 KiB per position: 32 MiB
UNDER_LIMIT = """import resource, sys
from appliance.bundle import Bundle
from appliance.engines import warm_up
from appliance.errors import ResourceError
bundle = Bundle.open(sys.argv[1])
special = bundle.tokenizer().special
engine = bundle.engine(threads=1)  # the session is loaded; the cache comes with the first prompt
with open("/proc/self/statm") as fh:
    used = int(fh.read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (used + (8 << 20), resource.RLIM_INFINITY))  # 8 MiB left: less than the cache
try:
    warm_up(engine, special.bos, special.gmask)  # what the app runs right after loading
except ResourceError as exc:
    print(exc)
    sys.exit(2)
"""


@pytest.fixture(scope="module")
def tiny_bundles(tmp_path_factory):
    """The tiny model as exported, and the same weights under a manifest that asks for a 32K-token context."""
    root = tmp_path_factory.mktemp("memory")
    config = ModelConfig.from_dict(json.loads((TINY / "config.json").read_text())).to_dict()
    config["max_sequence_length"] = LONG_CONTEXT
    long = export_bundle(TINY, root / "long", quant="fp32",
                         extra_manifest={"max_context": LONG_CONTEXT, "model": {"arch": "chatglm-6b", "config": config}})
    return export_bundle(TINY, root / "normal", quant="fp32").bundle, long.bundle


def test_a_cache_over_the_address_space_limit_is_refused_before_allocating(tiny_bundles, tmp_path):
    env = {**os.environ, "STREAMCHAT_CACHE_DIR": str(tmp_path / "cache")}
    refused = subprocess.run([sys.executable, "-c", UNDER_LIMIT, str(tiny_bundles[1])], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2, refused.stderr
    assert re.fullmatch(r"not enough memory: the KV cache for 32768 positions needs 32 MiB, have [0-8] MiB \(left under "
                        r"the \d+ MiB address-space limit \(ulimit -v\)\); close other programs or lower the context "
                        r"budget \(Settings\)\n", refused.stdout), refused.stdout


def test_the_estimate_is_what_the_engine_allocates(tiny_bundles):
    model = load_model(bundle=tiny_bundles[0], threads=1)  # loading warms up, which allocates the cache
    engine = model.engine
    assert engine.max_context == 256 and len(engine.decoder.cache) == 2 * 2
    assert sum(buffer.nbytes for buffer in engine.decoder.cache) == kv_cache_bytes(engine.config, 256) == 256 << 10


def test_the_static_engine_refuses_a_cache_that_cannot_fit():
    """ChatGLM-6B's 28 layers keep 896 KiB per position: a 1M-position cache would need 896 GiB."""
    config = ModelConfig.from_dict(real_config(28))
    with pytest.raises(ResourceError, match=r"^not enough memory: the KV cache for 1048576 positions needs 896\.0 GiB, "
                                            r"have [\d.]+ [GM]iB \(.*\); close other programs, or use a bundle exported "
                                            r"for a smaller context$"):
        StaticEngine("onnxruntime", config, 1 << 20, [64], OrtGraphRunner({}), pad_id=3)
    assert kv_cache_bytes(config, 2048) == 28 * 2 * 32 * 2048 * 128 * 4  # 1.75 GiB at the real context
