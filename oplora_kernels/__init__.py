"""GPU kernels of the oplora step engine: Triton kernels and their launchers only.

No autograd, no device probing and no work at import time: the Triton kernels compile at their
first launch, and ``oplora.backends`` (through ``oplora.backends.triton_ops``, which it imports when a
CUDA tensor first needs it) decides when they run -- for CUDA tensors, with
``TRITON_INTERPRET=1`` also for CPU tensors (tests).

Modules, for the ops of ``oplora.backends.ops.Ops`` that need a kernel (each specified by
``oplora.reference``):

* ``row_pass`` -- the only op that reads the captured rows X (T x n) and sD (T x m): every thin
  product of one pass of the LoRSum half-steps of many layers (the step's and the momentum's
  right-hand sides side by side), plus the diagonal K-FAC column sums of squares, in one read of
  the rows, for all layers in a handful of launches.

The Triton backend's other ops are plain torch and live in the package: ``thin_qr`` is the
batched float64 CholeskyQR2 of ``oplora.backends.cholqr``, and the r x r proximal solves are
``oplora.reference.prox_solve``, batched (one SVD per stack of same-shaped problems), on the
stacks the step engine hands over.

Design: why this blocking, and what is fast for which sizes
    An OPLoRA step is memory-bound: per pass it must stream X and sD of every layer (2 (m + n) T
    bytes in bf16), while the math per byte is ``K`` multiply-adds (K = the right-hand side
    columns, 2r for the step plus the momentum). ``row_pass`` gives each program ``BLOCK_T``
    rows of one chunk of one layer (default 128), streams those rows once for each tensor it
    needs, keeps the ``BLOCK_T x K`` intermediate in registers and adds its ``BLOCK_C x K``
    slices of the result into the output with float32 atomics (see ``row_pass``'s docstring for
    why that is race-free on a GPU). Two things make this the right blocking for LoRA shapes:
    rows are independent (any T splits into tiles without a second reduction kernel), and the
    results are thin (n x K), so the atomic traffic is ``K * 4 / (BLOCK_T * 2)`` of the row
    traffic in L2, not HBM. A 7B model (224 layers, T = 4096) is ~7000 programs in one launch:
    plenty of parallelism. A single small layer (T <= 512) has only a few programs; there a
    smaller ``block_t`` (32-64) fills the GPU better. The thin work between passes is r-sized:
    it is batched per group of same-shaped layers (``oplora.optim.engine``, ``thin_qr``,
    ``prox_solve``) so that it costs a few launches per pass, not a few per layer. Block sizes
    are untuned until a GPU run (``oplora-bench --suite kernels`` sweeps none; pass
    ``block_t``/``block_c`` to ``row_pass`` to try others).

    Float32 products use ``tl.dot(..., input_precision="tf32x3")`` on a GPU (three TF32
    tensor-core products: about float32 accuracy, the torch backend's default fp32 matmul
    precision); ``"ieee"`` or ``"bf16x3"`` can be passed to ``row_pass``. Float64 rows are sent
    to the reference by ``oplora.backends.triton_ops``.

The Triton interpreter (``TRITON_INTERPRET=1``), how the tests run these kernels without a GPU
    * It runs programs one at a time, sequentially: races cannot show, so the atomic reduction
      is argued correct (``row_pass`` docstring), not demonstrated, on the CPU; the ``cuda``
      tests check it on a GPU.
    * Its ``tl.dot`` is a NumPy matmul in the operands' dtype: exact float32 products whatever
      ``input_precision`` says, and no bfloat16/float16 dot (bfloat16 is stored as uint16 and
      would be multiplied as integers). The kernel therefore converts every tile to float32
      before ``tl.dot``, on the GPU too. It accepts only ``input_precision`` in
      tf32/tf32x3/ieee (``row_pass`` passes ``"ieee"`` there).
    * Scalars are 1-element arrays; with NumPy >= 2.4 ``int()`` of those raises, so a Python
      ``for ... in range(0, runtime_bound, step)`` fails inside the interpreter. The kernel's
      column loops are ``while`` loops under the interpreter and ``for`` loops (software
      pipelined) on a GPU, selected by the ``WHILE_LOOPS`` constexpr around one shared loop
      body: the body is what the CPU tests check.
    * ``tl.multiple_of`` alignment hints are no-ops. The interpreter copies a kernel's tensor
      arguments to the host but cannot follow the addresses in ``row_pass``'s segment table, so
      the launcher refuses GPU tensors under the interpreter and CPU tensors without it
      (``ValueError``). Hence the tests: ``python -m pytest`` (conftest sets
      ``TRITON_INTERPRET=1``) runs the kernels on CPU tensors and skips the GPU ones;
      ``TRITON_INTERPRET=0 python -m pytest -m cuda tests/`` on a GPU machine runs the compiled
      kernels (and skips the interpreter ones).
    * It is slow (Python per program and per slice): tests use small shapes and small blocks.
"""
