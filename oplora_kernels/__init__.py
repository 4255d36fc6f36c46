"""Triton kernels for oplora (tall-skinny least-squares half-steps, diagonal K-FAC statistics).

This package holds kernels and their launchers only: no autograd, no device probing and no work
at import time. ``oplora._backend`` decides when they run. The kernels are not written yet; until
they are, ``oplora.backend_info()`` reports the Triton backend as unavailable and every op runs on
the pure-torch reference (``oplora.reference``).
"""
