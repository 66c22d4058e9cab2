"""Serving behind NVIDIA Triton Inference Server (``xmr serve``; the ``serve`` extra).

``repository`` writes a Triton model repository of xmr's models, ``triton_model`` is the
Python-backend model that runs a ``Scorer`` inside the server, ``server`` starts and stops
the server (PyTriton's bundled ``tritonserver``). Nothing here is imported by ``xmr.runtime``.
"""
