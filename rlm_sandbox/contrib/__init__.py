"""Integrations with other libraries. Each submodule imports its library on first use only.

* :mod:`rlm_sandbox.contrib.rlm`: run the REPL of the ``rlms`` library (``import rlm``) in any
  rlm_sandbox backend (``pip install "rlm-sandbox[rlm]"``).
"""
