"""Trainer integrations: callbacks that drive a :class:`~nn_staining.NetworkTrace` from a trainer.

- :mod:`nn_staining.integrations.lightning`: ``StainingCallback``, a Lightning ``Callback``.
- :mod:`nn_staining.integrations.transformers`: ``StainingTrainerCallback``, a Hugging Face
  ``TrainerCallback``.

Each module imports its framework, which stays an optional dependency: importing one without
its framework installed raises an ``ImportError`` that says what to install.
"""
