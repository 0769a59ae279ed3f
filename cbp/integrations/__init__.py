"""CBP inside the training frameworks people already use; each module imports its framework.

``cbp.integrations.lightning.CBPCallback`` (PyTorch Lightning) and
``cbp.integrations.transformers.CBPCallback`` (Hugging Face Trainer) drive a
:class:`cbp.CBPOptimizer` from the framework's hooks: the loss of every training forward, the epoch
clock, stopping once g exceeds ``stop_once_g_exceeds``. Nothing here is imported by ``import cbp``,
so neither framework is needed unless one of these modules is imported (``pip install
cbp[lightning]``, ``cbp[transformers]``).
"""
