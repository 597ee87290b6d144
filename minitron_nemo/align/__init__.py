"""Alignment after distillation: preference pairs (``preferences.py``) and DPO (``dpo.py``)."""
