"""A run: the training loop, the run directory (its files, checkpoint content, resume checks),
interrupts, distillation, the peer methods, the plots.

Imports :mod:`cbp.core`, :mod:`cbp.files` and :mod:`cbp.zoo`; nothing below imports it.
"""
