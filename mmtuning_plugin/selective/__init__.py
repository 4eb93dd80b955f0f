"""Selective tuning: a modality's own weights train instead of adapters (LayerNorm tuning, bias tuning, whole
weights of chosen layers, SPIDER's importance-masked updates).

- `plan.py`: which base modules (and which of their tensors) a `selective:` setting trains, refusing packed
  4-bit modules;
- `runtime.py`: after PEFT wraps the model, freeze what the method does not train and check that what trains
  equals the plan;
- `spider.py`: the importance mask applied at each optimizer step, and its Trainer callback.
"""

from .plan import SelectedModule, plan_selective
