"""Measurement: the FLOP ledger and device peaks (flops), the eval loss (evaluate), TensorBoard
events beside log.jsonl (tb), throughput/MFU records, and loss-vs-FLOPs plots (plot).

See docs/measure.md for the convention and the formulas.
"""
