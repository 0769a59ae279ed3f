"""What is trained: the models (by name, with their weights), the data sets, and the task of a
run (a classifier or a language model).

Imports :mod:`cbp.core` and :mod:`cbp.files` only.
"""
