"""Tools to check HCMS on your own graphs, on N ranks inside one process or on N gloo processes.

- `ranks`: a fake process group and `run_on_ranks` (LocalTensorMode) for real per-rank data.
- `tracing`: `trace(fn, inputs, tracer)` with make_fx, torch.export, Dynamo or AOTAutograd.
- `compiled`: capture a backend's forward and backward graphs and run a training step on N ranks.
- `inductor`: one training step of the real Inductor-compiled model on N gloo processes.
- `strategies`: hypothesis strategies for Ulysses cases and chunk splits.
- `layouts`: reference Ulysses implementations in the layouts real libraries use.
- `equivalence`: `assert_equivalent` (and `assert_equivalent_all` for several `Check`s), the bitwise
  check of outputs and gradients, plain vs HCMS, in process (`inner="aot_eager"`) or on gloo
  processes with Inductor (`inner="inductor"`).
"""

from .equivalence import Check, Equivalence, assert_equivalent, assert_equivalent_all

__all__ = ["Check", "Equivalence", "assert_equivalent", "assert_equivalent_all"]
