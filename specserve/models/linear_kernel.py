"""How linear layers multiply: the weight layouts whose GEMMs are fastest on this device.

A forward step multiplies a few rows (one decode token, a verified token tree, a small batch)
by every weight matrix, so the speed of a skinny GEMM against weights streamed from memory sets
the step time. Which formulation is fast depends on the CPU's BLAS kernels and differs by 2x
between machines and between one row and several: ``(W @ x^T)^T`` against the checkpoint's
output-major ``W [out, in]``, ``x @ W`` against an input-major ``W [in, out]``, or oneDNN's
matmul against a weight it reordered once into its own blocked layout (where PyTorch has
oneDNN; MKL's GEMM repacks the whole weight on every call, oneDNN's prepacked one does not,
so a few rows cost about what one does). A :class:`KernelPlan` names the layout for steps of
one row, of two rows and of more, and whether a one-row step runs as two (its row twice): MKL's
GEMM streams a weight faster for two rows than any kernel here does for one (a forward of the
default model: 30 against 35 ms for one row, 29 against 39 for two). ``fastest_plan`` measures
it once per machine, dtype and weight shape (cached on disk), and each linear keeps its weight
in every layout its plan uses (at twice the memory where two differ).
"""

from __future__ import annotations

import enum
import functools
import json
import logging
import math
import platform
import time
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
from filelock import FileLock

from specserve.models.default_model import cache_root

logger = logging.getLogger(__name__)


class WeightLayout(str, enum.Enum):
    OUTPUT_MAJOR = "output_major"  # [out, in], as checkpoints store it: y = (W @ x^T)^T
    INPUT_MAJOR = "input_major"  # [in, out]: y = x @ W
    ONEDNN_PACKED = "onednn_packed"  # oneDNN's blocked layout of [out, in] (an opaque tensor)
    # int8 per output channel, prepacked for fbgemm; each call quantizes its rows. Not exact, so
    # never measured into a plan: only a draft model, whose numbers change drafts, not outputs.
    INT8_DYNAMIC = "int8_dynamic"


def int8_available(device_type: str) -> bool:
    """Whether this PyTorch build multiplies ``INT8_DYNAMIC`` weights on ``device_type`` (PyTorch
    marks its quantized tensors deprecated: a build without them falls back to float weights)."""
    return (
        device_type == "cpu"
        and "fbgemm" in torch.backends.quantized.supported_engines
        and hasattr(torch, "quantize_per_channel")
        and hasattr(torch.ops.quantized, "linear_dynamic")
    )


def available_layouts(device_type: str, dtype: torch.dtype = torch.float32) -> tuple[WeightLayout, ...]:
    """The exact layouts this PyTorch build can multiply ``dtype`` weights with on ``device_type``."""
    if device_type == "cpu" and _onednn_packs(dtype):
        return WeightLayout.OUTPUT_MAJOR, WeightLayout.INPUT_MAJOR, WeightLayout.ONEDNN_PACKED
    return WeightLayout.OUTPUT_MAJOR, WeightLayout.INPUT_MAJOR


def _onednn_packs(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if dtype == torch.float16:
        return torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return dtype == torch.float32


StoredWeight = torch.Tensor | torch.ScriptObject  # fbgemm's packed int8 weight is a script object


def linear(x: torch.Tensor, weight: StoredWeight, bias: torch.Tensor | None, layout: WeightLayout) -> torch.Tensor:
    """``x [..., in]`` times a weight stored in ``layout``, plus ``bias``."""
    if layout is WeightLayout.ONEDNN_PACKED:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    rows = x.reshape(-1, x.shape[-1])
    if layout is WeightLayout.INT8_DYNAMIC:
        out = torch.ops.quantized.linear_dynamic(rows, weight, _int8_reduce_range())
        out = out if bias is None else out + bias
    elif layout is WeightLayout.INPUT_MAJOR:
        out = rows @ weight if bias is None else torch.addmm(bias, rows, weight)
    else:
        out = weight @ rows.t() if bias is None else torch.addmm(bias.unsqueeze(1), weight, rows.t())
        out = out.t().contiguous()
    return out.reshape(*x.shape[:-1], out.shape[-1])


def to_layout(weight: torch.Tensor, layout: WeightLayout) -> StoredWeight:
    """An output-major (checkpoint) weight rearranged into ``layout``."""
    if layout is WeightLayout.ONEDNN_PACKED:
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)
    if layout is WeightLayout.INT8_DYNAMIC:
        return _int8_packed(weight)
    return weight.t().contiguous() if layout is WeightLayout.INPUT_MAJOR else weight


@functools.cache
def _int8_reduce_range() -> bool:
    """Whether int8 activations must use 7 bits: without VNNI, fbgemm adds pairs of u8 x s8
    products in 16 bits, which 8-bit activations can overflow. 8 bits halve the rounding error
    (on the default draft, top-1 equal to float32's at 90 % of prompt positions instead of 83 %)."""
    flags = set((_cpuinfo("flags") or "").split())
    return not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}


def _int8_packed(weight: torch.Tensor) -> torch.ScriptObject:
    """``weight [out, in]`` rounded to int8 with one symmetric scale per output row, prepacked."""
    weight = weight.float()
    scales = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12).double()
    zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # PyTorch flags its quantized tensors as deprecated
        warnings.simplefilter("ignore")
        quantized = torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(quantized, None)


class KernelPlan(NamedTuple):
    """The weight layout for steps of one row (batch-1 decode), of two and of more rows."""

    one_row: WeightLayout
    many_rows: WeightLayout
    two_rows: WeightLayout | None = None  # None: as many rows
    one_row_as_two: bool = False  # a one-row step multiplies its row twice, in ``one_row``

    @classmethod
    def single(cls, layout: WeightLayout) -> KernelPlan:
        return cls(layout, layout)

    @property
    def layouts(self) -> tuple[WeightLayout, ...]:
        """The distinct layouts the plan multiplies with (a weight is stored in each)."""
        return tuple(dict.fromkeys((self.one_row, self.two_rows or self.many_rows, self.many_rows)))

    def layout_for(self, rows: int) -> WeightLayout:
        if rows == 1:
            return self.one_row
        return self.two_rows if rows == 2 and self.two_rows is not None else self.many_rows

    def to_json(self) -> dict[str, str | bool | None]:
        return self._asdict()  # the layouts are str enums: JSON writes their values

    @classmethod
    def from_json(cls, data: dict[str, str | bool | None]) -> KernelPlan:
        two_rows = data["two_rows"]
        return cls(WeightLayout(data["one_row"]), WeightLayout(data["many_rows"]),
                   None if two_rows is None else WeightLayout(two_rows), bool(data["one_row_as_two"]))

    def __call__(self, shape: tuple[int, int]) -> KernelPlan:
        """A plan is its own ``PlanSource``: the same plan for weights of every shape."""
        return self


PlanSource = Callable[[tuple[int, int]], KernelPlan]  # a weight's (out, in) shape -> its plan


class PlannedWeight:
    """One linear's weight, stored in each layout its plan multiplies with."""

    def __init__(self, weight: torch.Tensor, plan: KernelPlan) -> None:
        self.plan = plan
        self.stored = {layout: to_layout(weight, layout) for layout in plan.layouts}

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        layout = self.plan.layout_for(rows)
        if rows == 1 and self.plan.one_row_as_two:
            twice = x.reshape(1, x.shape[-1]).repeat(2, 1)  # contiguous: an expanded view is slow
            return linear(twice, self.stored[layout], bias, layout)[:1].reshape(*x.shape[:-1], -1)
        return linear(x, self.stored[layout], bias, layout)


def measure_plan(shape: tuple[int, int] = (1024, 1024), dtype: torch.dtype = torch.float32, megabytes: int = 128,
                 repeats: int = 3) -> tuple[KernelPlan, dict[str, float]]:
    """The fastest plan among the CPU's layouts for ``dtype`` weights of ``shape`` (out, in), and
    the seconds per pass it was chosen from. A pass multiplies about ``megabytes`` of copies
    (more than a CPU cache holds, so they stream from memory as a model's do; at most 256 copies
    of a small one); the layouts and row counts take turns for ``repeats`` rounds after a warm-up
    one, and each keeps its least time, as the machine's noise only ever adds time."""
    layouts = available_layouts("cpu", dtype)
    out_features, in_features = shape
    count = min(256, max(1, megabytes * 2**20 // (out_features * in_features * dtype.itemsize)))
    output_major = [torch.randn(out_features, in_features, dtype=dtype) for _ in range(count)]
    weights = {layout: [to_layout(w, layout) for w in output_major] for layout in layouts}
    inputs = {rows: torch.randn(rows, in_features, dtype=dtype) for rows in (1, 2, 4, 16)}
    seconds = {f"{layout.value}/{rows}": math.inf for layout in layouts for rows in inputs}
    for round_ in range(repeats + 1):
        for layout, stored in weights.items():
            for rows, x in inputs.items():
                start = time.perf_counter()
                for w in stored:
                    linear(x, w, None, layout)
                if round_:  # the first round warms up
                    key = f"{layout.value}/{rows}"
                    seconds[key] = min(seconds[key], time.perf_counter() - start)

    def fastest(rows: tuple[int, ...]) -> WeightLayout:
        return min(layouts, key=lambda layout: sum(seconds[f"{layout.value}/{n}"] for n in rows))

    one_row, two_rows = fastest((1,)), fastest((2,))
    twice = seconds[f"{two_rows.value}/2"] < seconds[f"{one_row.value}/1"]  # one row runs faster as two
    return KernelPlan(two_rows if twice else one_row, fastest((4, 16)), two_rows, twice), seconds


@functools.cache
def _cpuinfo(field: str) -> str | None:
    """The first value of ``field`` in /proc/cpuinfo (None where there is none), read once."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU's model name (what its kernel plan and cost profile are measured for)."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_kernel_environment(dtype: torch.dtype = torch.float32) -> str:
    """What the speed of a CPU's GEMMs of ``dtype`` depends on besides the weight's shape: the
    CPU, the threads, the PyTorch build and the layouts it can multiply with (a key for
    measurements)."""
    layouts = "+".join(layout.value for layout in available_layouts("cpu", dtype))
    dtype_name = "" if dtype == torch.float32 else f"|{dtype}"
    return f"{cpu_name()}|threads={torch.get_num_threads()}|torch={torch.__version__}{dtype_name}|{layouts}"


# Named for the plans' form: plans without a two-row layout (kernel_plans.json) stay for the code
# that reads them, and are measured again in this form.
KERNEL_PLANS_FILE = "kernel_plans_v2.json"


@functools.cache
def fastest_plan(device_type: str, shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> KernelPlan:
    """The kernel plan for ``dtype`` weights of ``shape`` on ``device_type``; a CPU measures each
    shape once, then reads it from the cache. Shapes differ: a tall vocabulary head can take
    another kernel path for one row than the square matrices of a layer."""
    if device_type != "cpu":
        return KernelPlan.single(WeightLayout.OUTPUT_MAJOR)  # cuBLAS runs either at full speed
    key = f"{cpu_kernel_environment(dtype)}|{shape[0]}x{shape[1]}"
    path = cache_root() / KERNEL_PLANS_FILE
    with FileLock(f"{path}.lock"):
        known = json.loads(path.read_text()) if path.is_file() else {}
        if key not in known:
            plan, seconds = measure_plan(shape, dtype)
            logger.info("kernel plan on %s: %s (seconds per pass: %s)", key, plan, seconds)
            known[key] = plan.to_json()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(known, indent=1))
    return KernelPlan.from_json(known[key])
