"""The method: level sets, the constraint (paper Eq. 8-10), quantized layers, the penalty, the
Lagrangian (paper Algorithm 1) and its optimizer form, the oscillation tracker, the metrics.

The bottom layer: it imports nothing else of cbp.
"""
