"""checkpoint -> verified bundle, all or nothing.

The bundle is written into a hidden sibling directory, checksummed, opened through the same code the appliance
uses, verified against the numpy reference, and only then renamed into place. A crash, a full disk or a failed
verification leaves no directory that looks like a bundle.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import onnx

from appliance import __version__
from appliance.bundle import DIGEST, FORMAT, FORMAT_VERSION, MANIFEST, Bundle, sha256_file, write_manifest
from appliance.errors import StreamChatError
from appliance.model.quantize import BITS, GROUP_SIZES
from appliance.model.weights import WEIGHT_PRECISIONS
from appliance.model_config import KV_CACHE_DTYPES
from appliance.targets import DECODER, STATIC, TARGETS
from appliance.tokenizer import ChatGLMTokenizer
from model_export.checkpoint import Checkpoint
from model_export.graph import DecoderGraph, QuantReport, QuantSpec, default_kv_cache
from model_export.onnx_builder import ExternalData, GraphBuilder
from model_export.progress import Progress
from model_export.reference import ReferenceEngine, ReferenceModel
from model_export.verify import verify

DEFAULT_GROUP_SIZE = 128
BYTES_PER_WEIGHT = {"int4": 0.5 + 4 / 32, "int8": 1 + 4 / 32, "fp16": 2, "fp32": 4}  # worst case: group 32 scales
VERIFY_CONTEXT = 256  # the verification prompts and steps stay far below this; the cache is sized to it
LARGE_MODEL_PARAMS = 1_000_000_000  # above this, verification uses fewer prompts and steps (the reference is slow)


class ExportError(StreamChatError):
    """The export could not produce a bundle; nothing was published."""


@dataclass
class ExportResult:
    bundle: Path
    manifest: dict
    seconds: float


def default_embeddings(quant: str, target: str) -> str:
    """Quantized decoder-graph (cpu) bundles quantize lm_head (and the tied embedding) to INT8: an fp16 head is folded
    to a 2.1 GB fp32 matrix by onnxruntime and read in full for every token. Static-graph (Ascend) bundles store the
    tables like the block weights."""
    return "int8" if quant in BITS and TARGETS[target].graphs == DECODER else quant


def weakest_precision(*precisions: str) -> str:
    """The precision that bounds a bundle's accuracy (its verification thresholds follow it)."""
    return min(precisions, key=WEIGHT_PRECISIONS.index)  # listed from the fewest bits


def verified_precision(quant: str, embeddings: str, target: str) -> str:
    """The weakest precision of the graphs the export verifies. Static (Ascend) graphs hold fp16 weights for every
    quantization but fp32: their 8-bit weights are made by the converter on the conversion host, not in the graphs."""
    if TARGETS[target].graphs == STATIC:
        return "fp32" if quant == "fp32" else "fp16"
    return weakest_precision(quant, embeddings)


def checkpoint_fingerprint(ckpt: Checkpoint) -> str:
    """sha256 over config.json and, per weight file, its name, size and first/last MiB (hashing 13.7 GB would
    dominate the export; this still tells checkpoints apart and detects most truncation or replacement)."""
    digest = hashlib.sha256((ckpt.dir / "config.json").read_bytes())
    for file in sorted({ref.file for ref in ckpt.refs.values()}):
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with file.open("rb") as fh:
            digest.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            digest.update(fh.read(1 << 20))
    return digest.hexdigest()


def estimate_bytes(ckpt: Checkpoint, spec: QuantSpec, tied: bool, target: str) -> int:
    cfg = ckpt.config
    linear = sum(o * i for o, i in cfg.linear_shapes().values()) * cfg.num_layers
    tables = cfg.vocab_size * cfg.hidden_size * (1 if tied else 2)
    if TARGETS[target].graphs == STATIC:  # the graphs' own precision: the converter quantizes int8
        weights = embeddings = verified_precision(spec.weights, spec.embeddings, target)
    else:
        weights, embeddings = spec.weights, spec.embeddings
    return int(linear * BYTES_PER_WEIGHT[weights] + tables * BYTES_PER_WEIGHT[embeddings]) + (64 << 20)


def _check_request(target: str, quant: str, group_size: int, embeddings: str | None, kv_cache: str | None) -> None:
    if target not in TARGETS:
        raise ExportError(f"unknown target {target!r}: choose one of {', '.join(TARGETS)}")
    if quant not in WEIGHT_PRECISIONS:
        raise ExportError(f"unknown quantization {quant!r}: choose one of {', '.join(WEIGHT_PRECISIONS)}")
    if quant not in TARGETS[target].quants:
        raise ExportError(f"--quant {quant} is not offered for {target}: choose one of "
                          f"{', '.join(TARGETS[target].quants)} (Ascend runs fp16 weights, or 8-bit weights its "
                          "converter quantizes: --quant int8)")
    if quant in BITS and group_size not in GROUP_SIZES:
        raise ExportError(f"group size {group_size} is not supported: choose one of {GROUP_SIZES}")
    if embeddings is not None and embeddings not in WEIGHT_PRECISIONS:
        raise ExportError(f"unknown embedding precision {embeddings!r}: choose one of {', '.join(WEIGHT_PRECISIONS)}")
    if kv_cache is not None and kv_cache not in KV_CACHE_DTYPES:
        raise ExportError(f"unknown KV cache type {kv_cache!r}: choose one of {', '.join(KV_CACHE_DTYPES)}")


def _check_tokenizer(tokenizer: ChatGLMTokenizer, ckpt: Checkpoint) -> None:
    """The tokenizer's ids must address the weights' rows (the real vocabulary is padded: 130344 pieces, 130528 rows)."""
    cfg, special = ckpt.config, tokenizer.special
    pairs = {"<sop>": (special.bos, cfg.bos_token_id), "<eop>": (special.eos, cfg.eos_token_id),
             "[gMASK]": (special.gmask, cfg.gmask_token_id), "[MASK]": (special.mask, cfg.mask_token_id)}
    wrong = {piece: ids for piece, ids in pairs.items() if ids[0] != ids[1]}
    if wrong or tokenizer.vocab_size > cfg.vocab_size:
        raise ExportError(f"ice_text.model / tokenizer_config.json do not match config.json (tokenizer vs config ids: "
                          f"{wrong or 'vocabulary larger than the embedding'}); copy the tokenizer files that came with "
                          "these weights")


def _write_manifest(tmp: Path, manifest: dict, progress: Progress) -> None:
    """List every file with its sha256, then write the manifest and its digest; files already listed (unchanged since)
    keep their hash instead of re-reading gigabytes of weights."""
    known = {f["path"]: f for f in manifest.get("files", [])}
    files = sorted(p for p in tmp.rglob("*") if p.is_file() and p.relative_to(tmp).as_posix() not in (MANIFEST, DIGEST))
    todo = [p for p in files if p.relative_to(tmp).as_posix() not in known]
    with progress.stage("checksums", sum(p.stat().st_size for p in todo), "B") as advance:
        for p in todo:
            known[p.relative_to(tmp).as_posix()] = {"path": p.relative_to(tmp).as_posix(), "bytes": p.stat().st_size,
                                                    "sha256": sha256_file(p, advance)}
    manifest["files"] = [known[p.relative_to(tmp).as_posix()] for p in files]
    write_manifest(tmp, manifest)


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished bundle into place; an old bundle (with --force) is removed only after that succeeded."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_bundle(checkpoint_dir: str | Path, out: str | Path, target: str = "cpu", quant: str | None = None,
                  group_size: int = DEFAULT_GROUP_SIZE, embeddings: str | None = None, accuracy_level: int = 4,
                  force: bool = False, progress: Progress | None = None, name: str | None = None,
                  extra_manifest: dict | None = None, kv_cache: str | None = None) -> ExportResult:
    """Export ``checkpoint_dir`` to a verified bundle at ``out``; ``kv_cache`` (cpu target): the KV cache's element
    type, ``default_kv_cache(quant)`` unless given."""
    started = time.perf_counter()
    progress = progress or Progress(enabled=False)
    out = Path(out)
    if quant is None and target in TARGETS:
        quant = TARGETS[target].quants[0]  # the target's default
    _check_request(target, quant, group_size, embeddings, kv_cache)
    embeddings = embeddings or default_embeddings(quant, target)
    if out.exists() and not force:
        raise ExportError(f"{out} already exists: choose another --out or pass --force to replace it")
    ckpt = Checkpoint(checkpoint_dir)
    tokenizer = ChatGLMTokenizer.from_dir(ckpt.dir)
    _check_tokenizer(tokenizer, ckpt)
    spec = QuantSpec(weights=quant, group_size=group_size, embeddings=embeddings,
                     accuracy_level=accuracy_level if TARGETS[target].graphs == DECODER else 0,
                     kv_cache=kv_cache or default_kv_cache(quant))
    tied = ckpt.lm_head_is_tied()
    out.parent.mkdir(parents=True, exist_ok=True)
    need, free = estimate_bytes(ckpt, spec, tied, target), shutil.disk_usage(out.parent).free
    if need > free:
        raise ExportError(f"not enough disk space in {out.parent}: the bundle needs about {need / 1e9:.2f} GB, "
                          f"{free / 1e9:.2f} GB are free")
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        manifest = _build(ckpt, tokenizer, spec, tied, tmp, target, progress, name)
        ckpt.check_crcs()  # the build's in-order reads hashed the tensor entries; this covers anything they skipped
        manifest.update(extra_manifest or {})
        _write_manifest(tmp, manifest, progress)
        # an fp16 KV cache rounds like fp16 weights: a bundle is held to the thresholds of its weakest precision
        checked = verified_precision(quant, embeddings, target)
        if TARGETS[target].graphs == DECODER:
            checked = weakest_precision(checked, spec.kv_cache)
        report = _verify(ckpt, tmp, tokenizer, checked, progress, target)
        (tmp / "verify_report.json").write_text(json.dumps(report.to_dict(), indent=1), encoding="utf-8")
        if not report.passed:
            raise ExportError(f"verification failed, nothing published: {report.describe()}")
        manifest["verification"] = report.to_dict()
        _write_manifest(tmp, manifest, Progress(enabled=False))
        _publish(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise ExportError(f"no space left on the device while writing {out}: free at least "
                              f"{need / 1e9:.2f} GB and export again (nothing was published)") from exc
        raise ExportError(f"export failed while writing {out}: {exc} (nothing was published)") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(bundle=out, manifest=manifest, seconds=time.perf_counter() - started)


def _matrices(ckpt: Checkpoint) -> int:
    """The matrices an export quantizes: every layer's linear layers and the head (its progress unit)."""
    return ckpt.config.num_layers * len(ckpt.config.linear_shapes()) + 1


def _write_decoder_graph(ckpt: Checkpoint, spec: QuantSpec, tied: bool, tmp: Path, target: str, progress: Progress,
                         doc: str) -> tuple[dict, QuantReport]:
    """``decoder.onnx`` and its weights: one graph with dynamic shapes for onnxruntime."""
    cfg = ckpt.config
    data = ExternalData(tmp / "decoder.onnx.data")
    with progress.stage("tensors read + quantized", _matrices(ckpt), "matrix") as advance:
        graph = DecoderGraph(cfg, ckpt.tensor_as_stored, spec, GraphBuilder(data), tied=tied,
                             max_positions=cfg.max_sequence_length + 1, on_tensor=lambda _: advance())
        model = graph.build(doc=doc)
    data.close()
    with progress.stage("graph written", 1, "file") as advance:
        onnx.save_model(model, str(tmp / "decoder.onnx"))
        advance()
    return {"decoder": "decoder.onnx", "kv_layout": "[batch, heads, capacity, head_dim]",
            "kv_cache": spec.kv_cache}, graph.report


def _write_static_graphs(ckpt: Checkpoint, spec: QuantSpec, tied: bool, tmp: Path, target: str, progress: Progress,
                         doc: str) -> tuple[dict, QuantReport]:
    """Graphs per prefill gear, a decode graph and their conversion files, in the shapes the target compiles."""
    from model_export.ascend_targets import write_ascend_graphs

    with progress.stage("tensors read + quantized, graphs written", _matrices(ckpt), "matrix") as advance:
        return write_ascend_graphs(ckpt, ckpt.tensor_as_stored, spec.weights, spec.group_size, tied, target, tmp,
                                   lambda _: advance(), doc)


GRAPH_WRITERS = {DECODER: _write_decoder_graph, STATIC: _write_static_graphs}  # by the target's graph layout


def _build(ckpt: Checkpoint, tokenizer: ChatGLMTokenizer, spec: QuantSpec, tied: bool, tmp: Path, target: str,
           progress: Progress, name: str | None) -> dict:
    cfg = ckpt.config
    shutil.copyfile(tokenizer.model_file, tmp / "ice_text.model")
    doc = f"ChatGLM-6B decoder exported by streamchat {__version__} ({spec.weights}, {target})"
    graphs, report = GRAPH_WRITERS[TARGETS[target].graphs](ckpt, spec, tied, tmp, target, progress, doc)
    summary = report.summary()
    progress.note(f"quantization error (relative Frobenius): mean {summary.get('mean', 0):.4f}, max "
                  f"{summary.get('max', 0):.4f} ({summary.get('worst', '-')}); linear weights "
                  f"{report.linear_bytes / 1e6:.1f} MB, tables {report.table_bytes / 1e6:.1f} MB")
    (tmp / "export_report.json").write_text(json.dumps({"quant": spec.to_dict(), "summary": summary,
                                                         "errors": report.errors}, indent=1), encoding="utf-8")
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "name": name or "ChatGLM-6B",
        "model": {"arch": "chatglm-6b", "config": cfg.to_dict()},
        "target": target, "runtime": TARGETS[target].runtime,
        "quant": {**spec.to_dict(), "lm_head_shared_with_embedding": tied,
                  "linear_bytes": report.linear_bytes, "table_bytes": report.table_bytes},
        "tokenizer": {"file": "ice_text.model", "num_image_tokens": tokenizer.num_image_tokens,
                      "special_ids": tokenizer.special.as_dict()},
        "graphs": graphs,
        "max_context": graphs.get("capacity", cfg.max_sequence_length),
        "created_by": f"streamchat {__version__}",
        "source": {"checkpoint_fingerprint": checkpoint_fingerprint(ckpt), "checkpoint_dir": ckpt.dir.name},
    }


def _verify(ckpt: Checkpoint, tmp: Path, tokenizer: ChatGLMTokenizer, quant: str, progress: Progress, target: str):
    large = ckpt.config.param_count() > LARGE_MODEL_PARAMS
    prompts, steps = (2, 3) if large else (3, 8)
    bundle = Bundle.open(tmp, full_check=False)
    reference = ReferenceEngine(ReferenceModel.from_checkpoint(ckpt, lazy=large))
    with progress.stage("verified against the reference", prompts * (steps + 1), "step") as advance:
        # Ascend bundles: their fp32-compute graphs, on the CPU; a cpu bundle's cache sized for the short checks
        engine = bundle.engine(kind="onnxruntime", context=VERIFY_CONTEXT)
        report = verify(engine, reference, tokenizer, quant, prompts, steps, on_step=advance)
    progress.note(f"verification: {report.describe()}")
    return report
