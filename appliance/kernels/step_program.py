"""A decode step recorded once from the model definition and run in C, token after token.

Why: a decode step is 28 layers of small operations between the GEMVs; run from Python (numpy between kernel calls)
they cost a step 12-14 ms and hand-offs that left the thread team idle (docs/performance.md). Writing the step again
in C would be a second ChatGLM definition. Instead ``StepRecorder`` is an ``Ops`` (``appliance.model.definition``)
whose tensors are places in one float arena: running ``definition.forward`` on it for one token records every
operation as an instruction, and ``sc_step_run`` (``prompt_kernels.c``) executes that list per token: the linear
layers as INT4 GEMVs on repacked weights, attention over the fp16 cache at the step's position, the logits, and the
elementwise arithmetic (rotary, residuals) with numpy's broadcasting, all on one thread team with nothing in Python
between them.

What a step needs from outside is filled into the arena's inputs before each run: the token's embedding row and the
rotary tables of its two position rows. The instructions hold pointers to the decoder's own arrays (repacked weights,
norms, the cache), which ``StepProgram`` keeps alive; C checks every arena range before it runs anything.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from appliance.kernels.native import check
from appliance.kernels.prompt_kernels import Int4Weight, aligned
from appliance.model.definition import forward, net_attention_scale
from appliance.model_config import ModelConfig

FIELDS = 24  # int64 values per instruction (STEP_FIELDS in the C file)
DIMS = 4  # elementwise operations broadcast over at most this many axes (STEP_DIMS)
ALIGN = 16  # floats: every buffer starts on a 64-byte boundary
COPY, ADD, MUL, LAYER_NORM, LINEAR, GELU, ATTEND, LOGITS = range(8)  # the C file's STEP_* operations
GROUP = 128  # the repacked GEMV's group size
MAX_BLOCKS = 256  # groups in a row the repacked GEMV takes (PACKED_MAX_BLOCKS)
MAX_HEADS = 4096  # the step's attention takes at most this many heads, each at most this wide (STEP_ATTEND)


@dataclass(frozen=True)
class PackedLinear:
    """An INT4 matrix as the step's GEMV reads it: ``codes`` repacked by ``sc_repack_int4`` (64-byte aligned),
    ``scales`` float32 [N, K/128], ``bias`` float32 [N] or None."""

    codes: np.ndarray
    scales: np.ndarray
    bias: np.ndarray | None
    n: int
    k: int

    @classmethod
    def of(cls, weight: Int4Weight, lib: ctypes.CDLL) -> PackedLinear:
        """A copy of ``weight`` (groups of 128, N a multiple of 4: ``fits``) in the step's layout, owning its memory:
        nothing of it points into the bundle's map."""
        if not cls.fits(weight):
            raise ValueError(f"a {weight.n} x {weight.k} weight in groups of {weight.group} is not repacked: the step "
                             f"takes groups of {GROUP} and columns in fours")
        packed, scales, bias = weight.operands()
        codes = aligned(packed.nbytes)
        check(lib.sc_repack_int4(packed.ctypes.data, weight.n, weight.k, codes.ctypes.data), "sc_repack_int4")
        return cls(codes, np.array(scales, np.float32), None if bias is None else np.array(bias), weight.n, weight.k)

    @staticmethod
    def fits(weight: Int4Weight) -> bool:
        """Groups of 128, columns in fours, rows of at most MAX_BLOCKS groups (packed_fits in the C file)."""
        return weight.group == GROUP and weight.n % 4 == 0 and weight.k % GROUP == 0 and weight.k <= MAX_BLOCKS * GROUP


@dataclass(frozen=True)
class Head:
    """The lm_head as the logits GEMV reads it: MatMulNBits codes [N, blocks, group * bits / 8], scales [N, blocks]."""

    codes: np.ndarray
    scales: np.ndarray
    bits: int
    group: int


class StepWeights(Protocol):
    """What the recorder needs of a decoder: weights by the definition's names, and each layer's cache."""

    def linear(self, name: str) -> PackedLinear: ...

    def norm(self, name: str) -> tuple[np.ndarray, np.ndarray]: ...  # float32 weight, bias

    def head(self) -> Head: ...

    def cache(self, layer: int) -> tuple[np.ndarray, np.ndarray]: ...  # fp16 keys, values [heads, capacity, hd]


@dataclass(frozen=True)
class View:
    """A tensor of the recording: ``shape`` elements of ``buffer`` from ``offset``, ``strides`` apart (in floats)."""

    buffer: int
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def contiguous(self) -> bool:
        return self.strides == _row_major(self.shape)


@dataclass(frozen=True)
class Place:
    """An arena operand of an instruction: a buffer and an offset inside it."""

    buffer: int
    offset: int = 0


def _row_major(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))


def _bits(value: float) -> int:
    return int(np.float32(value).view(np.int32))


class StepRecorder:
    """The definition's operations for one token, recorded instead of computed (see the module's doc)."""

    def __init__(self, config: ModelConfig, weights: StepWeights, threads: int) -> None:
        """``threads``: the team's size (the attention's scratch holds one row of scores per thread)."""
        self.config, self.weights, self.threads = config, weights, threads
        self.sizes: list[int] = []  # floats per buffer
        self.pinned: set[int] = set()  # buffers that live for the whole program: inputs, constants, scratch
        self.constants: dict[int, np.ndarray] = {}
        self.inputs: dict[str, View] = {}
        self.code: list[list[int | Place]] = []
        self.scratch = {LINEAR: self._buffer(0, pinned=True), ATTEND: self._buffer(0, pinned=True)}

    # -- buffers ---------------------------------------------------------------------------------------------------

    def _buffer(self, size: int, pinned: bool = False) -> int:
        self.sizes.append(size)
        if pinned:
            self.pinned.add(len(self.sizes) - 1)
        return len(self.sizes) - 1

    def _new(self, shape: tuple[int, ...], pinned: bool = False) -> View:
        return View(self._buffer(int(np.prod(shape)), pinned), 0, shape, _row_major(shape))

    def _input(self, name: str, shape: tuple[int, ...]) -> View:
        self.inputs[name] = self._new(shape, pinned=True)
        return self.inputs[name]

    def _grow_scratch(self, op: int, size: int) -> Place:
        buffer = self.scratch[op]
        self.sizes[buffer] = max(self.sizes[buffer], size)
        return Place(buffer)

    def _emit(self, op: int, *fields: int | Place) -> None:
        self.code.append([op, *fields])

    @staticmethod
    def _contiguous(x: View, what: str) -> View:
        if not x.contiguous():
            raise ValueError(f"the step's {what} takes a contiguous row, not a view of shape {x.shape}")
        return x

    # -- Ops -------------------------------------------------------------------------------------------------------

    def embed(self, ids: object) -> View:
        return self._input("embedding", (1, self.config.hidden_size))

    def rotary_half(self, row: int) -> tuple[View, View]:
        shape = (1, 1, self.config.rotary_dim)
        return self._input(f"cos{row}", shape), self._input(f"sin{row}", shape)

    def linear(self, name: str, x: View) -> View:
        weight = self.weights.linear(name)
        x = self._contiguous(x, "GEMV")
        if x.size != weight.k:
            raise ValueError(f"{name}: a row of {x.size} does not fit {weight.k} inputs")
        out = self._new((1, weight.n))
        k = weight.k
        scratch = self._grow_scratch(LINEAR, k // 4 + 2 * (k // GROUP))  # int8 codes, scales, offsets
        bias = 0 if weight.bias is None else weight.bias.ctypes.data
        self._emit(LINEAR, Place(out.buffer), Place(x.buffer, x.offset), k, weight.n, weight.codes.ctypes.data,
                   weight.scales.ctypes.data, bias, scratch)
        return out

    def layer_norm(self, name: str, x: View) -> View:
        weight, bias = self.weights.norm(name)
        x = self._contiguous(x, "LayerNorm")
        if weight.dtype != np.float32 or weight.shape != (x.size,) or bias.shape != weight.shape or bias.dtype != weight.dtype:
            raise ValueError(f"{name}: a LayerNorm of {x.size} takes float32 weight and bias of that size, not "
                             f"{weight.shape} and {bias.shape}")
        out = self._new(x.shape)
        self._emit(LAYER_NORM, Place(out.buffer), Place(x.buffer, x.offset), x.size, weight.ctypes.data,
                   bias.ctypes.data, _bits(self.config.layernorm_epsilon))
        return out

    def split_heads(self, x: View, parts: int) -> list[View]:
        cfg = self.config
        x = self._contiguous(x, "head split")
        hd, head = cfg.head_dim, parts * cfg.head_dim
        if x.shape[-1] != cfg.num_heads * head:
            raise ValueError(f"a row of {x.shape[-1]} is not {cfg.num_heads} heads of {parts} x {hd}")
        shape, strides = (*x.shape[:-1], cfg.num_heads, hd), (*x.strides[:-1], head, 1)
        return [View(x.buffer, x.offset + i * hd, shape, strides) for i in range(parts)]

    def split(self, x: View, parts: int) -> list[View]:
        width = x.shape[-1] // parts
        return [View(x.buffer, x.offset + i * width * x.strides[-1], (*x.shape[:-1], width), x.strides)
                for i in range(parts)]

    def concat(self, xs: list[View]) -> View:
        out = self._new((*xs[0].shape[:-1], sum(x.shape[-1] for x in xs)))
        column = 0
        for x in xs:
            self._elementwise(COPY, View(out.buffer, column, x.shape, out.strides), x, None)
            column += x.shape[-1]
        return out

    def add(self, a: View, b: View | float | np.ndarray) -> View:
        return self._arithmetic(ADD, a, b)

    def mul(self, a: View, b: View | float | np.ndarray) -> View:
        return self._arithmetic(MUL, a, b)

    def gelu(self, x: View) -> View:
        x = self._contiguous(x, "GELU")
        out = self._new(x.shape)
        self._emit(GELU, Place(out.buffer), Place(x.buffer, x.offset), x.size)
        return out

    def attention(self, layer: int, q: View, k: View, v: View) -> View:
        cfg = self.config
        heads, hd = cfg.num_heads, cfg.head_dim
        for x in (q, k, v):
            if x.shape != (1, heads, hd) or x.strides[-1] != 1:
                raise ValueError(f"attention takes one row of {heads} heads of {hd}, not a view of shape {x.shape}")
        keys, values = self.weights.cache(layer)
        capacity = keys.shape[1]
        out = self._new((1, cfg.hidden_size))
        scratch = self._grow_scratch(ATTEND, heads * hd + capacity * self.threads)
        self._emit(ATTEND, Place(out.buffer), Place(q.buffer, q.offset), Place(k.buffer, k.offset),
                   Place(v.buffer, v.offset), heads, hd, q.strides[1], k.strides[1], v.strides[1], keys.ctypes.data,
                   values.ctypes.data, capacity, _bits(net_attention_scale(hd)), scratch)
        return out

    def output_rows(self, x: View) -> View:
        return x

    def lm_head(self, x: View) -> View:
        head = self.weights.head()
        x = self._contiguous(x, "logits")
        n, blocks, blob = head.codes.shape
        if (head.codes.dtype != np.uint8 or blob * 8 != head.group * head.bits or blocks * head.group != x.size
                or head.scales.dtype != np.float32 or head.scales.shape != (n, blocks)):
            raise ValueError(f"an lm_head of codes {head.codes.shape} and scales {head.scales.shape} does not take a "
                             f"row of {x.size} in {head.bits}-bit groups of {head.group}")
        logits = self._new((len(head.codes),))
        scratch = self._grow_scratch(LINEAR, x.size // 4 + 2 * (x.size // head.group))  # int8 codes, scales, offsets
        self._emit(LOGITS, Place(logits.buffer), Place(x.buffer, x.offset), x.size, head.group, head.bits,
                   len(head.codes), head.codes.ctypes.data, head.scales.ctypes.data, scratch)
        return logits

    # -- elementwise -----------------------------------------------------------------------------------------------

    def _arithmetic(self, op: int, a: View, b: View | float | np.ndarray) -> View:
        if not isinstance(b, View) and np.ndim(b) == 0:
            b = float(b)  # a Python number, numpy's scalars included
        elif not isinstance(b, View):
            constant = np.ascontiguousarray(b, dtype=np.float32)
            b = self._new(constant.shape, pinned=True)
            self.constants[b.buffer] = constant
        shape = tuple(np.broadcast_shapes(a.shape, b.shape if isinstance(b, View) else ()))
        out = self._new(shape)
        self._elementwise(op, out, a, b)
        return out

    def _elementwise(self, op: int, out: View, a: View, b: View | float | None) -> None:
        if len(out.shape) > DIMS:
            raise ValueError(f"the step broadcasts over at most {DIMS} axes, not {len(out.shape)}")

        def strides(x: View) -> list[int]:
            """x's strides over out's axes (padded on the left), 0 where x is broadcast"""
            pad = len(out.shape) - len(x.shape)
            own = [0] * pad + [0 if size == 1 else stride for size, stride in zip(x.shape, x.strides, strict=True)]
            return [0] * (DIMS - len(own)) + own

        shape = [1] * (DIMS - len(out.shape)) + list(out.shape)
        second = b if isinstance(b, View) else None
        self._emit(op, Place(out.buffer, out.offset), Place(a.buffer, a.offset),
                   -1 if second is None else Place(second.buffer, second.offset),
                   _bits(b) if isinstance(b, float) else 0, *shape, *strides(out), *strides(a),
                   *(strides(second) if second is not None else [0] * DIMS))


def attends(config: ModelConfig) -> bool:
    """Whether the step's attention takes this model's heads: whole vectors of 8, at most MAX_HEADS of at most
    MAX_HEADS floats (STEP_ATTEND in the C file)."""
    return config.head_dim % 8 == 0 and config.head_dim <= MAX_HEADS and config.num_heads <= MAX_HEADS


def record(config: ModelConfig, weights: StepWeights, threads: int) -> StepProgram:
    """The decode step of ``appliance.model.definition.forward`` for one token, as a program for a team of
    ``threads``."""
    recorder = StepRecorder(config, weights, threads)
    return StepProgram(recorder, forward(recorder, None))


class StepProgram:
    """The recorded instructions with their arena laid out: a buffer's place is reused once its last reader has run
    (a step's activations then fit in a few hundred KB besides the logits). ``output`` is what a run leaves, as an
    array over the arena."""

    def __init__(self, recorder: StepRecorder, output: View) -> None:
        pinned = recorder.pinned | {output.buffer}
        last_use: dict[int, int] = {}
        for index, fields in enumerate(recorder.code):
            for field in fields:
                if isinstance(field, Place):
                    last_use[field.buffer] = index
        offsets: dict[int, int] = {}
        free: dict[int, list[int]] = {}  # size in floats -> free places of that size
        end = 0

        def room(buffer: int) -> int:
            """the buffer's floats, rounded up to whole 64-byte lines"""
            return -(-max(recorder.sizes[buffer], 1) // ALIGN) * ALIGN

        def place(buffer: int) -> None:
            nonlocal end
            size = room(buffer)
            if free.get(size):
                offsets[buffer] = free[size].pop()
            else:
                offsets[buffer], end = end, end + size

        for buffer in sorted(pinned):
            place(buffer)
        for index, fields in enumerate(recorder.code):
            for field in fields:  # the output comes first: a place freed below is never its own instruction's output
                if isinstance(field, Place) and field.buffer not in offsets:
                    place(field.buffer)
            for buffer in {f.buffer for f in fields if isinstance(f, Place)}:
                if last_use[buffer] == index and buffer not in pinned:
                    free.setdefault(room(buffer), []).append(offsets[buffer])
        self.code = np.array([[offsets[f.buffer] + f.offset if isinstance(f, Place) else f for f in fields]
                              + [0] * (FIELDS - len(fields)) for fields in recorder.code], dtype=np.int64)
        self.arena = aligned(end * 4, np.float32)
        self.arena[:] = 0

        def array(view: View) -> np.ndarray:
            return self.arena[offsets[view.buffer] + view.offset:][:view.size].reshape(view.shape)

        for buffer, constant in recorder.constants.items():
            self.arena[offsets[buffer]:offsets[buffer] + constant.size] = constant.reshape(-1)
        self.inputs: Mapping[str, np.ndarray] = {name: array(view) for name, view in recorder.inputs.items()}
        self.output = array(output)
        self.weights = recorder.weights  # the arrays the instructions point into live as long as the program
