"""Compositions above the parts: the parameter-budget search ranked by short distillation (``search``:
pruning, distillation and training in one job) and iterative compression chains (``stages``)."""
