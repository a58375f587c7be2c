"""The benchmark harness's parts: ferroattn next to its peers, measured one way.

Dependencies run one way, from the bottom:

- ``argtypes``: argparse value parsers shared by every command line.
- ``env``: optional peer imports, the machine's description, thread counts per case.
- ``ceilings``: the fp32 GEMM rate and the memory-read bandwidth of this machine.
- ``timing``: candidates, the accuracy check, round-robin timing, cache flushes.
- ``peers``: the candidates other than ferroattn (NumPy, torch SDPA / FlexAttention, ONNX
  Runtime) and the float64 reference.
- ``tables``: text and markdown tables, result files.
- ``config``, ``cases``, ``report``: the side-by-side harness (``benches/harness.py``).
- ``sweeps``: the prefill thread sweep, the decode cells and the paged-cache cells
  (``benches/bench_prefill.py``, ``benches/bench_decode.py``, ``benches/bench_paged.py``).

ferroattn itself is imported by the entry points and passed down, so that a missing or broken
install is one clear error line.
"""
