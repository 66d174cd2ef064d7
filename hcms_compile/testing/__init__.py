"""Tools to check HCMS on your own graphs, on N ranks inside one process.

- `ranks`: a fake process group and `run_on_ranks` (LocalTensorMode) for real per-rank data.
- `tracing`: `trace(fn, inputs, tracer)` with make_fx, torch.export, Dynamo or AOTAutograd.
- `compiled`: capture a backend's forward and backward graphs and run a training step on N ranks.
- `strategies`: hypothesis strategies for Ulysses cases and chunk splits.
- `layouts`: reference Ulysses implementations in the layouts real libraries use.
- `equivalence`: `assert_equivalent`, the bitwise check of outputs and gradients, plain vs HCMS.
"""

from .equivalence import Equivalence, assert_equivalent

__all__ = ["Equivalence", "assert_equivalent"]
