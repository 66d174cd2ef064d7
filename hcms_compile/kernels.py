"""Sorting profiled kernel and operator names into the classes of an attention layer's time.

`benchmarks/breakdown.py` asks where the time of a (chunked) Ulysses layer goes; a profiler gives it
names only. Inductor's own kernels are sorted first and by their kind and fused ops alone: Inductor
names a kernel after the graph nodes it came from, so the layout copy feeding an all-to-all is
`triton_poi_fused_all_to_all_single_clone_0` (a copy, not a collective). Then the classes, checked in
this order (the first that fits wins, so a name is counted once):

- `collective`: NCCL kernels (`ncclDevKernel_SendRecv`, ...), the copy-engine exchange's device-to-device
  and peer-to-peer memcpys, and, on the CPU, the c10d / functional collective operators
  (`_c10d_functional::all_to_all_single`, `c10d::alltoall_base_`, gloo's);
- `attention`: cuDNN, flash, memory-efficient and CPU SDPA kernels and operators;
- `concat`: `torch.cat`: `aten::cat`, ATen's `CatArrayBatchedCopy` kernel, and Inductor kernels whose
  fused name holds the op `cat` (`triton_poi_fused_cat_1`, `cpp_fused_cat_clone_2`);
- `copy`: other memcpys (host and device), ATen copy / clone kernels and operators, and Inductor's pointwise kernels
  (`triton_poi_fused_clone_0`): in this layer a pointwise kernel only moves data between layouts;
- `other`: the rest (fills, reductions, allocations, ...).
"""

from __future__ import annotations

import re

from .bench_plot import classify as trace_lane

CLASSES = ("attention", "collective", "copy", "concat", "other")

_COPY = ("memcpy", "copy", "clone", "contiguous")
_CONCAT_OPS = ("aten::cat", "aten::_cat", "aten::concat", "aten::concatenate")
# Inductor's generated kernels: triton_{poi,per,red,tem}_fused_<ops>_<n> on GPU, cpp_fused_<ops>_<n> on
# CPU (the profiler may prefix the graph's name: graph_0_cpp_fused_clone_0)
_INDUCTOR = re.compile(r"(?:triton_(?P<kind>[a-z]+)_|cpp_)fused_(?P<ops>\w*?)(?:_\d+)?$")


def classify(name: str) -> str:
    """The class (one of `CLASSES`) of one device kernel's or CPU operator's name."""
    lower = name.lower()
    inductor = _INDUCTOR.search(lower)
    if inductor:  # before the words below: its fused ops may name the collective or SDPA it feeds
        # "cat" as one op of the fused name, not a substring: not scatter, not truncate
        if "cat" in inductor.group("ops").split("_"):
            return "concat"
        if inductor.group("kind") in (None, "poi") or any(word in inductor.group("ops") for word in _COPY):
            return "copy"
        return "other"
    # c10d: the functional collectives' waits and c10d's own ops, which the trace plot's words miss
    if "c10d" in lower:
        return "collective"
    comm_or_attention = trace_lane(name)  # the words `hcms bench --trace-png` sorts lanes by
    if comm_or_attention != "other":
        return "collective" if comm_or_attention == "comm" else comm_or_attention
    if lower in _CONCAT_OPS or "catarray" in lower:
        return "concat"
    if any(word in lower for word in _COPY):
        return "copy"
    return "other"
